"""The device budget: a token bucket spacing device calls, a breaker that parks a silent device."""

from __future__ import annotations

import asyncio

import pytest

from agent.drivers.base import AppliesMany, CanReadMany, ChecksPolicy, ReadsMany, reads_many
from agent.errors import NoAnswerError, PermanentError
from agent.executor.budget import CLOSED, HALF_OPEN, HEADROOM, OPEN, Breaker, TokenBucket, check_options
from agent.executor.budgets import BreakerOpen, DeviceBudgets
from agent.executor.deadlines import Deadlines
from agent.model.device import Device
from tests.support.wait import until


def most_in_one_second(starts: list[float]) -> int:
    return max(sum(1 for t in starts if s <= t < s + 1.0) for s in starts)


def test_a_bucket_spaces_operations_so_no_second_holds_more_than_the_rate():
    bucket, now, starts = TokenBucket(20), 100.0, []
    for i in range(200):
        now += bucket.reserve(now) + (0.003 if i % 7 == 0 else 0.0)  # sometimes a wait overruns
        bucket.started(now)
        starts.append(now)
    assert 19 <= most_in_one_second(starts) <= 20
    assert starts[-1] - starts[0] == pytest.approx(199 / (20 * HEADROOM), abs=0.2)  # and the rate is used


def test_a_bucket_lets_the_first_call_and_calls_after_a_pause_go_at_once():
    bucket = TokenBucket(2)
    assert bucket.reserve(10.0) == 0.0
    assert bucket.reserve(10.1) == pytest.approx(0.5 / HEADROOM - 0.1)
    assert bucket.reserve(20.0) == 0.0


def test_parallel_callers_each_get_their_own_slot():
    bucket = TokenBucket(10 / HEADROOM)
    assert [round(bucket.reserve(5.0), 3) for _ in range(4)] == [0.0, 0.1, 0.2, 0.3]


def test_a_breaker_opens_after_trip_after_timeouts_in_a_row():
    b = Breaker(trip_after=3, cooldown=30)
    assert not b.timed_out(0) and not b.timed_out(1)
    assert b.timed_out(2)
    assert (b.state, b.timeouts, b.until, b.trips) == (OPEN, 3, 32, 1)


def test_any_answer_resets_the_count_only_silence_trips():
    b = Breaker(trip_after=3)
    b.timed_out(0)
    b.timed_out(0)
    assert not b.answered()  # an error from the device is an answer too
    assert not b.timed_out(0) and not b.timed_out(0)
    assert b.state == CLOSED


def test_after_the_cool_down_one_probe_decides():
    b = Breaker(trip_after=1, cooldown=30)
    b.timed_out(0)
    assert not b.due(29.9) and b.due(30)
    b.probing()
    assert b.state == HALF_OPEN and not b.closed
    assert b.timed_out(31)  # no answer: open for another cool-down
    assert (b.state, b.until, b.trips) == (OPEN, 61, 2)
    b.probing()
    assert b.answered()  # an answer closes it
    assert (b.state, b.timeouts) == (CLOSED, 0)


def test_trip_after_zero_never_opens():
    b = Breaker(trip_after=0)
    assert not any(b.timed_out(t) for t in range(100))
    assert b.closed


@pytest.mark.parametrize("options, wrong", [
    ({"max_rate": 0}, "max_rate must be a number above 0"),
    ({"max_rate": "fast"}, "max_rate must be"),
    ({"max_rate": True}, "max_rate must be"),
    ({"max_rate": 20_000}, "at most 10000"),
    ({"trip_after": -1}, "trip_after must be an integer from 0 to 1000"),
    ({"trip_after": 2.5}, "trip_after must be"),
    ({"trip_cooldown": 0}, "trip_cooldown must be a number of seconds from 1 to 86400"),
    ({"trip_cooldown": float("nan")}, "trip_cooldown must be"),
])
def test_bad_budget_options_are_refused_with_what_they_mean(options, wrong):
    assert wrong in (check_options(options) or "")


def test_good_budget_options_pass():
    assert check_options({}) is None
    assert check_options({"max_rate": 0.5, "trip_after": 0, "trip_cooldown": 600}) is None
    assert check_options({"max_rate": None}) is None


class Router:
    name = "fake"

    def __init__(self) -> None:
        self.silent = True
        self.calls: list[str] = []

    async def read(self, device: Device, service: str) -> str:
        self.calls.append("read")
        if self.silent:
            raise NoAnswerError(f"read on {device.id} timed out")
        return "on"

    async def probe(self, device: Device) -> None:
        self.calls.append("probe")
        if self.silent:
            await asyncio.sleep(3600)  # the deadline ends it

    async def apply(self, device: Device, service: str, state: str) -> None:
        raise PermanentError("no such service")  # an answer


async def test_a_silent_device_trips_its_breaker_parks_and_is_woken_when_a_probe_answers():
    dev = Device("r1", "fake", options={"trip_after": 2, "trip_cooldown": 0.2})
    router, woken, deadlines = Router(), [], Deadlines(resolution=0.01)

    async def on_closed(ids: list[str]) -> None:
        woken.extend(ids)

    budgets = DeviceBudgets(deadlines, lambda _d: 0.1, lambda: {"r1": dev}, on_closed)
    driver = budgets.wrap(router)  # type: ignore[arg-type]
    tasks = [asyncio.create_task(deadlines.run()), asyncio.create_task(budgets.run())]
    try:
        for _ in range(2):
            with pytest.raises(NoAnswerError):
                await driver.read(dev, "wifi")
        assert (why := budgets.gate(dev)) and why.startswith("breaker_open: 2 timeouts in a row, retry after ")
        with pytest.raises(BreakerOpen):
            await driver.read(dev, "wifi")
        assert router.calls == ["read", "read"]  # not asked while open
        await until(lambda: router.calls.count("probe") == 1, what="the probe after the cool-down")
        await until(lambda: budgets.breakers["r1"].state == OPEN, what="the silent probe opening it again")
        assert budgets.gate(dev) and not woken
        router.silent = False
        await until(lambda: woken == ["r1"], what="the answering probe closing it")
        assert budgets.gate(dev) is None
        assert await driver.read(dev, "wifi") == "on"
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def test_an_error_answer_resets_the_count():
    dev = Device("r1", "fake", options={"trip_after": 2})
    router = Router()
    budgets = DeviceBudgets(Deadlines(), lambda _d: 1.0, lambda: {"r1": dev}, lambda _ids: asyncio.sleep(0))
    driver = budgets.wrap(router)  # type: ignore[arg-type]
    for _ in range(3):
        with pytest.raises(NoAnswerError):
            await driver.read(dev, "wifi")
        with pytest.raises(PermanentError):
            await driver.apply(dev, "wifi", "on")
    assert budgets.gate(dev) is None


async def test_a_rate_limit_wait_does_not_count_against_the_call_deadline():
    dev = Device("r1", "fake", options={"max_rate": 5})
    router = Router()
    router.silent = False
    deadlines = Deadlines(resolution=0.01)
    budgets = DeviceBudgets(deadlines, lambda _d: 1.0, lambda: {"r1": dev}, lambda _ids: asyncio.sleep(0))
    driver = budgets.wrap(router)  # type: ignore[arg-type]
    sweeper = asyncio.create_task(deadlines.run())
    try:
        for _ in range(3):  # the second and third wait 0.2 s each, under a deadline of 0.1 s
            with deadlines.limit(0.1):
                assert await driver.read(dev, "wifi") == "on"
    finally:
        sweeper.cancel()
    assert budgets.waits["r1"][0] == 2
    assert [f["rate_waits"] for f in budgets.figures().devices] == [2]
    assert budgets.figures().rate_waits["r1"][0] == 2


def test_the_budgeted_driver_reads_many_only_where_the_driver_does():
    budgets = DeviceBudgets(Deadlines(), lambda _d: 1.0, dict, lambda _ids: asyncio.sleep(0))
    assert not hasattr(budgets.wrap(Router()), "read_many")  # type: ignore[arg-type]
    assert not hasattr(budgets.wrap(Router()), "apply_many")  # type: ignore[arg-type]


class Listing(Router):
    """A router that reads many services at once, but only of a device with a list to read."""

    async def read_many(self, device: Device, services: list[str]) -> dict[str, str]:
        return dict.fromkeys(services, "on")

    def can_read_many(self, device: Device) -> bool:
        return "list_path" in device.options


class Policed(Router):
    async def check_policy(self, device: Device, services: object) -> list[str]:
        return ["list blocked is used by no enabled firewall rule"]


def test_a_budgeted_driver_has_exactly_the_capabilities_of_the_driver_it_wraps():
    budgets = DeviceBudgets(Deadlines(), lambda _d: 1.0, dict, lambda _ids: asyncio.sleep(0))
    plain, listing, policed = (budgets.wrap(d) for d in (Router(), Listing(), Policed()))  # type: ignore[arg-type]
    listed, bare = Device("r1", "fake", options={"list_path": "/l"}), Device("r2", "fake")
    assert not isinstance(plain, ReadsMany | CanReadMany | AppliesMany | ChecksPolicy)
    assert not reads_many(plain, listed)
    assert isinstance(listing, ReadsMany) and not isinstance(listing, AppliesMany | ChecksPolicy)
    assert reads_many(listing, listed) and not reads_many(listing, bare)  # it asks the driver per device
    assert isinstance(policed, ChecksPolicy) and not isinstance(policed, ReadsMany)


async def test_a_budgeted_read_of_many_services_is_the_drivers_read_of_many():
    dev = Device("r1", "fake", options={"list_path": "/l"})
    budgets = DeviceBudgets(Deadlines(), lambda _d: 1.0, lambda: {"r1": dev}, lambda _ids: asyncio.sleep(0))
    driver = budgets.wrap(Listing())  # type: ignore[arg-type]
    assert isinstance(driver, ReadsMany)
    assert await driver.read_many(dev, ["a", "b"]) == {"a": "on", "b": "on"}


async def test_a_write_of_many_services_in_one_call_is_one_paced_operation():
    dev = Device("r1", "fake", options={"max_rate": 1000, "trip_after": 1})

    class Many(Router):
        async def apply_many(self, device: Device, want: dict[str, str]) -> dict[str, None]:
            raise NoAnswerError("no answer")

    budgets = DeviceBudgets(Deadlines(), lambda _d: 1.0, lambda: {"r1": dev}, lambda _ids: asyncio.sleep(0))
    driver = budgets.wrap(Many())  # type: ignore[arg-type]
    with pytest.raises(NoAnswerError):
        await driver.apply_many(dev, {"a": "on", "b": "on"})
    assert budgets.gate(dev) is not None  # its silence counts like any call's


async def test_a_refused_connection_is_an_answer_not_a_timeout():
    from agent.errors import UnreachableError

    class Refusing(Router):
        async def read(self, device: Device, service: str) -> str:
            raise UnreachableError(f"{device.id}: cannot connect: connection refused")

    dev = Device("r1", "fake", options={"trip_after": 1})
    budgets = DeviceBudgets(Deadlines(), lambda _d: 1.0, lambda: {"r1": dev}, lambda _ids: asyncio.sleep(0))
    driver = budgets.wrap(Refusing())  # type: ignore[arg-type]
    for _ in range(3):
        with pytest.raises(UnreachableError):
            await driver.read(dev, "wifi")
    assert budgets.gate(dev) is None


async def test_timeouts_during_a_tunnel_outage_are_forgotten_when_the_tunnel_is_back():
    dev = Device("r1", "fake", options={"trip_after": 3, "trip_cooldown": 3600})
    other = Device("r2", "fake", options={"trip_after": 1, "trip_cooldown": 3600})
    router = Router()
    budgets = DeviceBudgets(Deadlines(), lambda _d: 1.0, lambda: {"r1": dev, "r2": other},
                            lambda _ids: asyncio.sleep(0))
    driver = budgets.wrap(router)  # type: ignore[arg-type]
    for d in (dev, dev, other):
        with pytest.raises(NoAnswerError):
            await driver.read(d, "wifi")
    assert budgets.gate(other) is not None
    budgets.reachable(["r1", "r2"])  # the VPN guard: reachable again
    assert budgets.breakers["r1"].timeouts == 0  # two more timeouts do not trip it
    assert budgets.breakers["r2"].due(budgets._clock())  # an open one is probed now, not in an hour


def test_status_shows_the_rate_limit_and_an_open_breaker():
    from agent.cli.status import budget_line
    from agent.runtime.snapshot import Figures, status_line

    opened = {"device": "r1", "max_rate": 20.0, "rate_waits": 153, "rate_wait_s": 4.07, "breaker": "open",
              "timeouts": 5, "trips": 1, "retry_after": "2026-12-31T23:59:30.000Z"}
    assert budget_line(opened) == ("r1: max_rate 20/s, 153 waits (4.1s); breaker open: 5 timeouts in a row, "
                                   "retry after 2026-12-31T23:59:30.000Z")
    calm = {**opened, "max_rate": None, "breaker": "closed", "trips": 2}
    assert budget_line(calm) == "r1: breaker closed (opened 2 times)"
    f = Figures("a1", "default", "device_tasks", "1", started=True, listener_up=True, queue_depth=0,
                budgets=[opened])
    assert "1 breaker open" in status_line(f)


def test_the_pace_of_a_device_is_what_a_claim_must_cover_beyond_its_calls():
    from agent.executor.budget import pace

    assert pace(Device("r1", "sim")) == 0.0
    assert pace(Device("r1", "sim", options={"max_rate": 0.5})) == pytest.approx(2 / HEADROOM)
