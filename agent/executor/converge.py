"""The converge operation: make services on one device match their desired states, and prove it.

One operation for commands (a take, agent/executor/executor.py) and for reconciliation's repairs
(agent/reconcile/worker.py): read the services (in one request where the driver can), write what
differs (in one call where the driver can, else up to the device's max_parallel at once), read back
what was written and judge it. A write that answered OK is not proof: success means a read-back
that matches (`Converged.proof`). The rules of its device calls are one (`Calls`): each call under
its own deadline, and before each write and before the read-back the device claim is asked whether
it still covers that call; a device this agent may no longer hold is not written.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass

from agent.drivers.base import AppliesMany, Driver, ReadsMany, reads_many
from agent.errors import AgentError, NoAnswerError, PermanentError, TransientError
from agent.executor import budget
from agent.executor.deadlines import Deadlines
from agent.model.device import Device, State


@dataclass(slots=True)
class Observation:
    """A reading of one service. A value: never changed once made (not frozen only because a frozen
    dataclass costs three times as much to make, and a command makes up to three)."""

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


def batch_reader(driver: Driver, device: Device) -> ReadsMany | None:
    """The driver, as a reader of many services of this device in one request (`reads_many`: a
    driver may say per device, e.g. http only with a `list_path`); None: one read per service, each
    under its own deadline."""
    return driver if isinstance(driver, ReadsMany) and reads_many(driver, device) else None


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
            states = await batch.read_many(device, services)
    except Exception as exc:
        raise _translate(exc, step, device, timeout) from exc
    at = _now()
    result: dict[str, Observation | AgentError] = {}
    found = states if isinstance(states, Mapping) else {}  # (Mapping is an ABC: asked once, not per service)
    for service in services:
        value = found.get(service)
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


async def apply_many(driver: AppliesMany, device: Device, want: dict[str, State], bound: float,
                     deadlines: Deadlines) -> dict[str, float | AgentError]:
    """A take's writes in one driver call, where the driver has `apply_many(device, {service: state})`
    (one statement for many, e.g. the RADIUS policy of a month-end), within `bound` (what the writes
    one by one would have had); per service when it was answered (unix time) or its error."""
    step = _Step()
    step.what = "apply"
    try:
        with deadlines.limit(bound):
            found = await driver.apply_many(device, dict(want))
    except Exception as exc:
        return dict.fromkeys(want, _translate(exc, step, device, bound))
    now = _now()
    out: dict[str, float | AgentError] = {}
    for service in want:
        result = found.get(service, TransientError(f"apply on {device.id}: the driver left {service} unwritten"))
        out[service] = result if isinstance(result, AgentError) else now
    return out


def call_timeout(device: Device, default: float) -> float:
    """The deadline of one device call: AGENT_DEVICE_TIMEOUT, or longer if the driver's own
    `timeout` option is longer (the driver then times out first, with its own message)."""
    try:
        own = float(device.options.get("timeout", 0))
    except (TypeError, ValueError):
        own = 0.0
    return max(default, own + 1.0) if own else default


def max_parallel(device: Device) -> int:
    """How many writes the device takes at once (its `max_parallel` option, default 1)."""
    value = device.options.get("max_parallel", 1)
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 1 else 1


async def _held(_seconds: float) -> bool:
    return True


@dataclass(frozen=True)
class Calls:
    """The rules of one operation's device calls, the same for commands and reconciliation: each
    call under its own deadline (`timeout`), at most `parallel` writes at once, and before each
    write and before the read-back `claim(seconds)` says whether the device claim still covers a
    call of that long (renewing it where it can)."""

    timeout: float
    deadlines: Deadlines
    claim: Callable[[float], Awaitable[bool]] = _held
    parallel: int = 1
    turn: float = 0.0  # the wait for one call's turn in the device's max_rate

    @classmethod
    def of(cls, device: Device, timeout: float, deadlines: Deadlines,
           claim: Callable[[float], Awaitable[bool]] = _held) -> Calls:
        """The device's rules: `call_timeout` from the agent's `timeout`, its max_parallel and max_rate."""
        return cls(call_timeout(device, timeout), deadlines, claim, max_parallel(device), budget.pace(device))

    def need(self, seconds: float) -> float:
        """What the claim must still cover for a call of `seconds`: it, its turn in the max_rate for
        each write at once, and a margin."""
        return seconds + self.turn * self.parallel + 2.0


@dataclass
class Converged:
    """What one service's operation did: its first reading, its write (when it was answered, or its
    error; None when it was not written) and its read-back (after a write only)."""

    device: str
    service: str
    desired: State
    before: Observation | AgentError
    applied: float | AgentError | None = None
    after: Observation | AgentError | None = None

    @property
    def left(self) -> bool:
        """It differs but was not written: the operation yielded before its write (`urgent`)."""
        return isinstance(self.before, Observation) and self.before.observed != self.desired and self.applied is None

    def proof(self) -> Observation | AgentError:
        """The reading that proves the desired state (the first one when it already matched, else
        the read-back, with when it was written), or the error that leaves it unproven: a
        VerifyError when the device answered the write but reads back something else."""
        first, wrote, back = self.before, self.applied, self.after
        if isinstance(first, AgentError):
            return first
        if first.observed == self.desired:
            return Observation(first.observed, first.observed_at, None, first.observed_at)
        if not isinstance(wrote, float):
            return wrote or TransientError(f"{self.device}: {self.service} was not written")
        if not isinstance(back, Observation):
            return back or TransientError(f"{self.device}: {self.service} was not read back")
        if back.observed != self.desired:
            return VerifyError(f"verification failed: wrote {self.desired!r} to {self.service} on {self.device}, "
                               f"read back {back.observed!r}", applied_at=wrote, observed=back.observed)
        return Observation(back.observed, back.observed_at, wrote, back.observed_at)

    def silence(self) -> NoAnswerError | None:
        """The no-answer its first read, write or read-back got, if one did."""
        return next((e for e in (self.before, self.applied, self.after) if isinstance(e, NoAnswerError)), None)


Desired = Mapping[str, State] | Callable[[], Awaitable[Mapping[str, State]]]


async def converge(driver: Driver, device: Device, services: Sequence[str], calls: Calls, desired: Desired, *,
                   batch: bool = True, urgent: Callable[[], bool] | None = None) -> dict[str, Converged]:
    """Read `services`; write each service of `desired` whose state differs; read back what was
    written. Per service of `desired` (which `services` must hold), what happened: judge it with
    `Converged.proof`. Never raises for a device's failure: each service carries its own.

    `desired` may be a function, awaited after the read and before anything is written (a take's
    acceptance: its round trip overlaps the device read); a service it leaves out is not written.
    `batch`: read with `read_many` where the driver can (a shared read that falls back to reading
    service by service), else one `read` per service. `urgent`: once it says so, no further write
    starts (at least one is made, so the operation always progresses); the services not written are
    `left`, and not read back."""
    read = observe_for_take if batch else _observe_each
    before = await read(driver, device, list(services), calls.timeout, calls.deadlines)
    want = desired if isinstance(desired, Mapping) else await desired()
    differ = sorted(svc for svc, state in want.items()
                    if isinstance(first := before[svc], Observation) and first.observed != state)
    applied = await _write(driver, device, differ, want, calls, urgent)
    written = [svc for svc in differ if isinstance(applied.get(svc), float)]
    after: dict[str, Observation | AgentError] = {}
    if written and not await calls.claim(calls.need(calls.timeout)):
        after = {svc: ClaimShort(f"{device.id}: claim ran short before the read-back") for svc in written}
    elif written:
        after = await read(driver, device, written, calls.timeout, calls.deadlines)
    return {svc: Converged(device.id, svc, state, before[svc], applied.get(svc), after.get(svc))
            for svc, state in want.items()}


async def converge_one(driver: Driver, device: Device, service: str, desired: State, calls: Calls) -> Observation:
    """`converge` of one service, each call a `read` or an `apply` of its own: the reading that
    proves it, or raises the error that leaves it unproven (ClaimShort: the claim ran short)."""
    done = await converge(driver, device, [service], calls, {service: desired}, batch=False)
    proof = done[service].proof()
    if isinstance(proof, AgentError):
        raise proof
    return proof


async def _write(driver: Driver, device: Device, services: list[str], want: Mapping[str, State], calls: Calls,
                 urgent: Callable[[], bool] | None) -> dict[str, float | AgentError]:
    """Write each service, in one call where the driver can (`apply_many`), else up to `parallel` at
    once; per service the answer time or the error, and nothing for a service not written (`urgent`).
    One at a time (the default) they are awaited in turn: no task and no semaphore hand-over per
    write, which in a busy loop cost a few milliseconds each."""
    if len(services) > 1 and isinstance(driver, AppliesMany):  # one call for all
        bound = calls.timeout * -(-len(services) // calls.parallel)  # what the writes one by one would have had
        if not await calls.claim(calls.need(bound)):
            return {svc: ClaimShort(f"{device.id}: claim ran short before the write") for svc in services}
        return await apply_many(driver, device, {svc: want[svc] for svc in services}, bound, calls.deadlines)
    out: dict[str, float | AgentError] = {}
    started = 0

    def go_on() -> bool:
        return started == 0 or urgent is None or not urgent()

    async def one(svc: str) -> None:
        if not await calls.claim(calls.need(calls.timeout)):
            out[svc] = ClaimShort(f"{device.id}: claim ran short before the write")
            return
        try:
            out[svc] = await apply_one(driver, device, svc, want[svc], calls.timeout, calls.deadlines)
        except AgentError as exc:
            out[svc] = exc

    if calls.parallel == 1:
        for svc in services:
            if not go_on():
                break
            started += 1
            await one(svc)
        return out
    gate = asyncio.Semaphore(calls.parallel)

    async def gated(svc: str) -> None:
        nonlocal started
        async with gate:
            if not go_on():
                return
            started += 1
            await one(svc)

    await asyncio.gather(*(gated(svc) for svc in services))
    return out


class VerifyError(TransientError):
    """The device accepted the write but reads back something else."""

    def __init__(self, message: str, applied_at: float, observed: State) -> None:
        super().__init__(message)
        self.applied_at = applied_at
        self.observed = observed


class ClaimShort(TransientError):
    """The device claim no longer covers the next call: it was not made (database unreachable?)."""


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
