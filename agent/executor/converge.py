"""The converge operation: make one service on one device match a desired state, and prove it.

Shared by commands and (later) periodic reconciliation. A write that answered OK is not
proof: success means a read-back that matches.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from agent.drivers.base import Driver
from agent.errors import AgentError, NoAnswerError, PermanentError, TransientError
from agent.executor.deadlines import Deadlines
from agent.model.device import Device, State


@dataclass(frozen=True)
class Observation:
    observed: State
    observed_at: float                 # unix time: cheap to take and to encode, thousands a second
    applied_at: float | None = None    # set when a write was needed and answered OK
    verified_at: float | None = None   # set when a read-back matched desired


_now = time.time
log = logging.getLogger("agent.executor")


async def observe(driver: Driver, device: Device, service: str, timeout: float,
                  deadlines: Deadlines) -> Observation:
    """Read the state, within `timeout`."""
    step = _Step()
    try:
        with deadlines.limit(timeout):
            return await _observe(driver, device, service, step)
    except Exception as exc:
        raise _translate(exc, step, device, timeout) from exc


def batch_reader(driver: Driver, device: Device) -> Callable[[Device, list[str]], Awaitable[dict[str, Any]]] | None:
    """The driver's `read_many` when it reads many services of this device in one request: a
    driver may say per device (`can_read_many(device)`, e.g. http only with a `list_path`); without
    it, one read per service, each under its own deadline."""
    batch = getattr(driver, "read_many", None)
    ask = getattr(driver, "can_read_many", None)
    return batch if batch is not None and (ask is None or ask(device)) else None


async def observe_many(driver: Driver, device: Device, services: list[str], timeout: float,
                       deadlines: Deadlines) -> dict[str, Observation | AgentError]:
    """Read many services of one device: one request where the driver can (`batch_reader`), else
    one read after another, all within `timeout` per device call. A service that cannot be read is
    an error in the result; raises (one of our kinds) only when the whole read failed."""
    batch = batch_reader(driver, device)
    if batch is None:
        return await _observe_each(driver, device, services, timeout, deadlines)
    step = _Step()
    try:
        with deadlines.limit(timeout):
            states = await batch(device, services)
    except Exception as exc:
        raise _translate(exc, step, device, timeout) from exc
    at = _now()
    result: dict[str, Observation | AgentError] = {}
    for service in services:
        value = states.get(service) if isinstance(states, dict) else None
        if isinstance(value, AgentError):
            result[service] = value
        elif value in ("on", "off"):
            result[service] = Observation(observed=value, observed_at=at)
        else:
            result[service] = UnusableReply(f"driver {device.driver!r} returned {value!r} for {service} "
                                            f"on {device.id}")
    return result


async def observe_for_take(driver: Driver, device: Device, services: list[str], timeout: float,
                           deadlines: Deadlines) -> dict[str, Observation | AgentError]:
    """`observe_many` for commands taken together: a batch read is shared, so its failure is no one
    command's own. When it fails as a whole, or its answer for a service is unusable (no state, and
    no error of that service), those services are read one by one, each under its own deadline:
    only a command whose own read fails fails. Never raises."""
    failed: AgentError | None = None
    try:
        result = await observe_many(driver, device, services, timeout, deadlines)
    except AgentError as exc:
        result, failed = {}, exc
    again = services if failed else [service for service in services if isinstance(result[service], UnusableReply)]
    if again:
        why = failed or result[again[0]]
        log.warning("batch read failed, reading %d service(s) one by one: %s", len(again), why,
                    extra={"action": "batch_read_failed", "device": device.id, "error": str(why)})
        result.update(await _observe_each(driver, device, again, timeout, deadlines))
    return result


async def _observe_each(driver: Driver, device: Device, services: list[str], timeout: float,
                        deadlines: Deadlines) -> dict[str, Observation | AgentError]:
    """One read after another, each under its own deadline. A read without answer is followed by a
    probe: a device that does not answer that either is not asked for the rest (each would wait a
    whole deadline), they get its no-answer; one that answers it goes on, so a single service that
    hangs never keeps the others from being read."""
    step = _Step()
    out: dict[str, Observation | AgentError] = {}
    silent: NoAnswerError | None = None
    for service in services:
        if silent is not None:
            out[service] = NoAnswerError(f"{service} not read: {silent}")
            continue
        try:
            with deadlines.limit(timeout):
                out[service] = await _observe(driver, device, service, step)
        except Exception as exc:
            out[service] = err = _translate(exc, step, device, timeout)
            if isinstance(err, NoAnswerError) and service != services[-1]:
                silent = await _silent(driver, device, timeout, deadlines)
    return out


async def _silent(driver: Driver, device: Device, timeout: float, deadlines: Deadlines) -> NoAnswerError | None:
    """The no-answer of a probe, or None when the device answered it (with an error or not)."""
    step = _Step()
    step.what = "probe"
    try:
        with deadlines.limit(timeout):
            await driver.probe(device)
    except Exception as exc:
        err = _translate(exc, step, device, timeout)
        return err if isinstance(err, NoAnswerError) else None
    return None


async def apply_one(driver: Driver, device: Device, service: str, desired: State, timeout: float,
                    deadlines: Deadlines) -> float:
    """One write within `timeout`; returns when it was answered (unix time)."""
    step = _Step()
    step.what = "apply"
    try:
        with deadlines.limit(timeout):
            await driver.apply(device, service, desired)
    except Exception as exc:
        raise _translate(exc, step, device, timeout) from exc
    return _now()


async def apply_many(driver: Driver, device: Device, want: dict[str, State], bound: float,
                     deadlines: Deadlines) -> dict[str, float | AgentError]:
    """A take's writes in one driver call, where the driver has `apply_many(device, {service: state})`
    (one statement for many, e.g. the RADIUS policy of a month-end), within `bound` (what the writes
    one by one would have had); per service when it was answered (unix time) or its error."""
    step = _Step()
    step.what = "apply"
    try:
        with deadlines.limit(bound):
            found = await driver.apply_many(device, dict(want))  # type: ignore[attr-defined]
    except Exception as exc:
        return dict.fromkeys(want, _translate(exc, step, device, bound))
    now = _now()
    out: dict[str, float | AgentError] = {}
    for service in want:
        result = found.get(service, TransientError(f"apply on {device.id}: the driver left {service} unwritten"))
        out[service] = result if isinstance(result, AgentError) else now
    return out


async def converge(driver: Driver, device: Device, service: str, desired: State, timeout: float,
                   deadlines: Deadlines, proceed: Callable[[], Awaitable[bool]] | None = None) -> Observation | None:
    """Read; write only if different; read back. Raises TransientError when the read-back differs.

    `proceed`, awaited after the first read and before anything could be written, may stop the
    operation (returns None): the command's acceptance runs meanwhile, so its round trip to the
    database overlaps the device read instead of adding to it.
    `timeout` is per device call; the whole operation (at most three calls) gets three times it.
    """
    step = _Step()
    try:
        with deadlines.limit(timeout * 3):
            before = await _observe(driver, device, service, step)
            if proceed is not None and not await proceed():
                return None
            if before.observed == desired:
                return Observation(desired, before.observed_at, None, before.observed_at)
            step.what = "apply"
            await driver.apply(device, service, desired)
            applied_at = _now()
            after = await _observe(driver, device, service, step)
    except Exception as exc:
        raise _translate(exc, step, device, timeout) from exc
    if after.observed != desired:
        raise VerifyError(
            f"verification failed: wrote {desired!r} to {service} on {device.id}, "
            f"read back {after.observed!r}", applied_at=applied_at, observed=after.observed)
    return Observation(desired, after.observed_at, applied_at, after.observed_at)


class VerifyError(TransientError):
    """The device accepted the write but reads back something else."""

    def __init__(self, message: str, applied_at: float, observed: State) -> None:
        super().__init__(message)
        self.applied_at = applied_at
        self.observed = observed


class UnusableReply(PermanentError):
    """A batch read's answer for one service that is neither a state nor that service's own error."""


class _Step:
    what = "read"


async def _observe(driver: Driver, device: Device, service: str, step: _Step) -> Observation:
    step.what = "read"
    state = await driver.read(device, service)
    if state not in ("on", "off"):
        raise PermanentError(f"driver {device.driver!r} returned {state!r} for {service} on {device.id}")
    return Observation(observed=state, observed_at=_now())


def _translate(exc: Exception, step: _Step, device: Device, timeout: float) -> AgentError:
    """Driver failures become our error kinds, once, here; a driver bug is retried, not fatal."""
    if isinstance(exc, AgentError):
        return exc
    if isinstance(exc, TimeoutError):
        return NoAnswerError(f"{step.what} on {device.id} timed out ({timeout:g}s per call)")
    return TransientError(f"{step.what} on {device.id} failed: {type(exc).__name__}: {exc}")
