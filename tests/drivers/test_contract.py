"""The driver contract: what every driver, built-in or plugin, must do against its test server.

Parametrised over every installed driver (conftest.py says where each one's target module comes
from). A check a target cannot express is skipped with its reason (Target.skip); a check its driver
does not pass yet is a strict xfail (Target.known_gaps), so the suite says when the gap closes.
Every check runs direct and through a WAN-like link ([...-direct] and [...-wan], see link.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import pytest

from agent.drivers.base import Driver, DriverContext, ReadsMany, reads_many
from agent.drivers.registry import load_driver
from agent.errors import ConfigError, NoAnswerError, PermanentError, TransientError, UnreachableError
from agent.model.device import Device, State
from tests.drivers.link import OFF_THE_LINK, proxy, reseed
from tests.drivers.target import Target

Call = Callable[[], Awaitable[Any]]


def timeout_of(device: Device, context: DriverContext) -> float:
    """The seconds a device's calls may take: its `timeout` option, else the context's default."""
    return float(device.options.get("timeout", context.device_timeout))


def guard(target: Target, device: Device) -> float:
    """How long the suite waits before calling a driver hung: well past the driver's own timeout."""
    return 2 * timeout_of(device, target.context) + 5


def flip(state: State) -> State:
    return "off" if state == "on" else "on"


async def outcome(aw: Awaitable[Any], limit: float) -> tuple[Exception | None, float]:
    """Run one driver call: the exception it raised (or None) and how long it took."""
    start = time.monotonic()
    deadline = asyncio.timeout(limit)
    try:
        async with deadline:
            await aw
    except Exception as exc:
        if deadline.expired():
            raise AssertionError(f"no answer from the driver within {limit:g}s: it must time out on its own") from None
        return exc, time.monotonic() - start
    return None, time.monotonic() - start


def described(exc: BaseException | None) -> str:
    return "no error" if exc is None else f"{type(exc).__name__}: {exc}"


def chain_text(exc: BaseException) -> str:
    """Everything an operator could see of an error: its text, repr and every chained cause."""
    parts: list[str] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        parts += [str(current), repr(current), *map(str, current.args)]
        current = current.__cause__ or current.__context__
    return "\n".join(parts)


def record_text(record: logging.LogRecord) -> str:
    """A log record as any handler could render it, its extra fields included."""
    return logging.Formatter().format(record) + "\n" + repr(vars(record))


@pytest.fixture(autouse=True)
def contract_rules(request: pytest.FixtureRequest, target: Target, link: str) -> None:
    """Apply the target's skips and known gaps to this check, after checking their names."""
    checks = {name.removeprefix("test_") for name in globals() if name.startswith("test_")}
    unknown = (set(target.skip) | set(target.known_gaps)) - checks
    if unknown:
        pytest.fail(f"target for {target.driver} names unknown check(s) {sorted(unknown)}; known: {sorted(checks)}")
    if target.fake_backed:
        request.node.add_marker(pytest.mark.fake_backed)
    check = request.node.originalname.removeprefix("test_")
    if link != "direct" and check in OFF_THE_LINK:
        pytest.skip(f"{target.driver}: run direct only: {OFF_THE_LINK[check]}")
    reseed(target.driver, check)
    if check in target.skip:
        pytest.skip(f"{target.driver}: {target.skip[check]}")
    if check in target.known_gaps:
        request.node.add_marker(pytest.mark.xfail(reason=f"{target.driver}: {target.known_gaps[check]}",
                                                  strict=True))


async def test_target_devices_pass_option_validation(target: Target, driver: Driver) -> None:
    assert isinstance(driver, Driver), f"{type(driver).__name__} does not implement agent.drivers.base.Driver"
    for device in (target.device, target.unreachable, target.slow, target.bad_credential):
        if device is not None:
            driver.validate_options(device)


async def test_probe_answers_on_the_working_device(target: Target, driver: Driver) -> None:
    exc, _ = await outcome(driver.probe(target.device), guard(target, target.device))
    assert exc is None, f"probe of the working device failed: {described(exc)}"


async def test_read_after_apply_matches(target: Target, driver: Driver) -> None:
    dev, service = target.device, target.service
    before = await driver.read(dev, service)
    assert before == await target.observe(service), "the driver reads another state than the device has"
    for state in (flip(before), before):  # both states, ending where it started
        await driver.apply(dev, service, state)
        assert await target.observe(service) == state, f"apply {state!r} answered OK but the device did not change"
        assert await driver.read(dev, service) == state, f"read after apply {state!r} disagrees"


async def test_many_services_read_at_once_agree_with_the_device(target: Target, driver: Driver) -> None:
    """A router with thousands of customers: many services read together (read_many where the driver
    has it, as a take or a reconcile does) each give their real state, however large the reply."""
    if not target.bulk:
        pytest.skip(f"target for {target.driver} lists no bulk services (Target.bulk)")
    dev = target.device
    async with asyncio.timeout(guard(target, dev) + 0.05 * len(target.bulk)):
        if isinstance(driver, ReadsMany) and reads_many(driver, dev):
            got = dict(await driver.read_many(dev, list(target.bulk)))
        else:
            got = {service: await driver.read(dev, service) for service in target.bulk}
    if target.observe_many is not None:
        real = await target.observe_many(list(target.bulk))
    else:
        real = {service: await target.observe(service) for service in target.bulk}
    wrong = {s: (described(got[s]) if isinstance(got.get(s), Exception) else got.get(s), real[s])
             for s in target.bulk if got.get(s) != real[s]}
    assert not wrong, f"{len(wrong)} of {len(target.bulk)} services read wrong (got, real), e.g. " \
                      f"{dict(list(wrong.items())[:3])}"


async def test_a_connection_reset_mid_reply_is_a_transient_failure(target: Target) -> None:
    """A VPN drops a connection in the middle of a reply: the driver reports a failure to try again
    (TransientError and its kinds), never a permanent one or a configuration problem, and never a
    state read from the part that arrived."""
    link = proxy(target.driver)
    if link is None:
        pytest.skip(f"{target.driver}: only through the WAN-like TCP link, which can reset a connection")
    dev = target.device
    services = list(target.bulk) or [target.service]
    limit = guard(target, dev) + 0.05 * len(services)
    cuts = 0
    for after in (20000, 4000, 1000):  # mid-reply for a large reply, in the handshake for a small one
        driver = load_driver(target.driver, target.context)  # a fresh connection for each cut
        resets, link.reset_after = link.resets, after
        got: dict[str, Any] = {}
        try:
            async with asyncio.timeout(limit):
                if isinstance(driver, ReadsMany):
                    got = dict(await driver.read_many(dev, services))
                else:
                    got = {services[0]: await driver.read(dev, services[0])}
        except TimeoutError:
            raise AssertionError(f"no answer from the driver within {limit:g}s: it must time out on its own") from None
        except Exception as exc:
            got = dict.fromkeys(services, exc)
        finally:
            link.reset_after = None
            await driver.close()
        if link.resets == resets:
            continue  # the whole exchange was shorter than `after`
        cuts += 1
        for service, said in got.items():
            if isinstance(said, Exception):
                assert isinstance(said, TransientError), \
                    f"{service}: a connection reset after {after} bytes: expected TransientError, got {described(said)}"
        read = {service: said for service, said in got.items() if not isinstance(said, Exception)}
        if read:  # the driver tried again on its own: what it read must be whole
            real = await target.observe_many(list(read)) if target.observe_many is not None else \
                {service: await target.observe(service) for service in read}
            assert read == real, f"states read from a reply cut after {after} bytes disagree with the device"
    assert cuts, "no exchange with the device was long enough to be cut"


async def test_apply_is_idempotent(target: Target, driver: Driver) -> None:
    dev, service = target.device, target.service
    before = await driver.read(dev, service)
    for state in (flip(before), before):
        await driver.apply(dev, service, state)
        for _ in range(2):  # the state it already has, twice
            exc, _elapsed = await outcome(driver.apply(dev, service, state), guard(target, dev))
            assert exc is None, f"applying the current state {state!r} again failed: {described(exc)}"
        assert await target.observe(service) == state
        assert await driver.read(dev, service) == state


async def test_missing_object_is_permanent(target: Target, driver: Driver) -> None:
    dev, missing = target.device, target.missing_service
    calls: dict[str, Call] = {"read": partial(driver.read, dev, missing),
                              "apply on": partial(driver.apply, dev, missing, "on"),
                              "apply off": partial(driver.apply, dev, missing, "off")}
    for what, call in calls.items():
        exc, _ = await outcome(call(), guard(target, dev))
        assert isinstance(exc, PermanentError), f"{what} of missing {missing!r}: expected PermanentError, " \
                                                f"got {described(exc)}"


async def test_unreachable_device_fails_to_connect(target: Target, driver: Driver) -> None:
    dev = target.unreachable
    no_answer_explained = any("unreachable" in f"{k} {v}".lower() or "noanswer" in f"{k} {v}".lower()
                              for k, v in target.notes.items())
    calls: dict[str, Call] = {"read": partial(driver.read, dev, target.service), "probe": partial(driver.probe, dev)}
    for what, call in calls.items():
        exc, _ = await outcome(call(), guard(target, dev))
        if isinstance(exc, NoAnswerError) and not isinstance(exc, UnreachableError) and no_answer_explained:
            continue
        assert isinstance(exc, UnreachableError), (
            f"{what} of the unreachable device: expected UnreachableError, got {described(exc)}"
            + (" (NoAnswerError is accepted only when Target.notes['unreachable'] says why the protocol cannot "
               "tell)" if isinstance(exc, NoAnswerError) else ""))


async def test_slow_device_hits_its_timeout(target: Target, driver: Driver) -> None:
    dev = target.slow
    limit = timeout_of(dev, target.context)
    exc, elapsed = await outcome(driver.read(dev, target.service), guard(target, dev))
    assert isinstance(exc, NoAnswerError) and not isinstance(exc, UnreachableError), \
        f"read of the slow device: expected NoAnswerError (a timeout), got {described(exc)}"
    assert 0.5 * limit <= elapsed <= 1.5 * limit + 1, \
        f"timed out after {elapsed:.2f}s, but its timeout is {limit:g}s"


async def test_wrong_credential_is_config_error(target: Target, driver: Driver) -> None:
    if target.bad_credential is None:
        pytest.skip(f"target for {target.driver} provides no bad_credential device")
    exc, _ = await outcome(driver.read(target.bad_credential, target.service), guard(target, target.bad_credential))
    assert isinstance(exc, ConfigError), f"read with a wrong credential: expected ConfigError, got {described(exc)}"


async def test_invalid_service_key_refused_before_io(target: Target, driver: Driver) -> None:
    key = target.invalid_service
    fast = 0.5 * timeout_of(target.slow, target.context)  # any round trip to the slow device takes longer
    for dev in (target.unreachable, target.slow, target.device):  # I/O would fail there, or wait there
        calls: dict[str, Call] = {"read": partial(driver.read, dev, key),
                                  "apply": partial(driver.apply, dev, key, "off")}
        for what, call in calls.items():
            exc, elapsed = await outcome(call(), guard(target, dev))
            assert isinstance(exc, PermanentError), \
                f"{what} {key!r} on {dev.address}: expected PermanentError before any I/O, got {described(exc)}"
            assert elapsed < fast, f"{what} {key!r} took {elapsed:.2f}s: it waited for the device"


async def test_secrets_never_appear_in_errors_or_logs(target: Target, driver: Driver,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    assert target.secrets and all(len(s) >= 4 for s in target.secrets), \
        "list the credential's secret values in Target.secrets (or skip this check with the reason)"
    caplog.set_level(logging.DEBUG)
    dev, service = target.device, target.service
    state = await driver.read(dev, service)
    calls: list[tuple[Device, Call]] = [
        (dev, partial(driver.probe, dev)), (dev, partial(driver.apply, dev, service, state)),
        (dev, partial(driver.read, dev, target.missing_service)),
        (dev, partial(driver.apply, dev, target.missing_service, "off")),
        (dev, partial(driver.read, dev, target.invalid_service)),
        (target.unreachable, partial(driver.read, target.unreachable, service)),
        (target.slow, partial(driver.read, target.slow, service))]
    if target.bad_credential is not None:
        calls.append((target.bad_credential, partial(driver.read, target.bad_credential, service)))
    texts = []
    for device, call in calls:
        exc, _ = await outcome(call(), guard(target, device))
        if exc is not None:
            texts.append(chain_text(exc))
    texts += [record_text(r) for r in caplog.records]
    for secret in target.secrets:
        leaks = [t.replace(secret, "<SECRET>")[:400] for t in texts if secret in t]
        assert not leaks, f"a secret of {target.driver} appears in an error or log record: {leaks[0]!r}"
