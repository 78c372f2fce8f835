"""Runs one reconcile message inside the device's lane: read back every service that has a desired
state, and repair what drifted with the same converge operation commands use.

Same rules as commands: one operation at a time per device (the lane, and the device claim across
agents), the VPN gate, bounded retries with the retry policy's backoff (capped at a few seconds,
since the lane waits), and nothing guessed: a service that cannot be read is reported unreadable.
Between device calls it keeps a pace, so a reconcile never floods a device.

Unlike a command, a reconcile message does not wait for its device without end, or its run would
never finish (and the leader's next scheduled runs would find the device still outstanding): a
paused device is reported at once as not checked, and a device behind the gate (unreachable) is
parked until AGENT_RECONCILE_UNREACHABLE_WAIT seconds after the message was fed, then reported as
not checked, with the reason, in agent.sync_devices.skipped. The next run checks it again.

A driver that reads many services in one request (`read_many`: RouterOS, SNMP, http with a
`list_path`, sim) is read in requests of up to READ_BATCH services: a router with thousands of
services in sync is a few dozen calls, not thousands paced apart while the commands behind the
reconcile wait in the lane. Only what
that reading leaves open (drift to confirm or repair, a service it could not read) takes calls of
its own.

Commands go first: before each service it checks (and between its batch reads), the commands that
arrived in the device's lane meanwhile run (Executor.make_way), under the same slot and claim, and
the run goes on where it was. The services those commands were for are judged against their
desired state as it is then (read again from agent.service_state), from a reading of their own; a
service left without one is not checked. The run's counts stay those of one pass over the device.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import asyncpg

from agent.db.connect import DB_ERRORS
from agent.db.queries import Queries
from agent.drivers.base import ChecksPolicy, Driver
from agent.drivers.registry import Drivers
from agent.errors import AgentError, ConfigError, PermanentError, TransientError
from agent.executor import parklog
from agent.executor.converge import Calls, ClaimShort, Observation, batch_reader, converge_one, observe, observe_many
from agent.executor.deadlines import Deadlines
from agent.executor.lanework import LaneWork
from agent.executor.policy import ParkPolicy, RetryPolicy
from agent.model.device import Device, State
from agent.model.outcome import Delivery, EventRow, Outcome, StateUpdate
from agent.reconcile.judge import Finding, needs_repair, summary
from agent.reconcile.request import SyncRequest
from agent.text import clean

log = logging.getLogger("agent.reconcile")
INLINE_DELAY_CAP = 5.0
READ_BATCH = 100  # services read in one request at most (a take of AGENT_COALESCE's default reads as many)
T = TypeVar("T")


@dataclass
class SyncWork:
    """A reconcile message in its device's lane: it runs on its own, and lets commands overtake it."""

    delivery: Delivery
    request: SyncRequest
    device: Device
    kind: LaneWork
    joins_take: ClassVar[bool] = False
    high: ClassVar[bool] = False

    @property
    def service(self) -> str | None:
        return self.request.service

    @property
    def identities(self) -> dict[str, Any]:
        return {"device": self.device.id, "msg_id": self.delivery.msg_id}


@dataclass(frozen=True)
class ReconcileTuning:
    confirm: int = 1            # readings that must differ before drift is repaired
    confirm_delay: float = 2.0  # seconds between them
    pace: float = 0.2           # seconds between a device's reconcile calls
    unreachable_wait: float = 120.0  # seconds a message waits for a device behind the gate, then it is skipped


class _Forged(Exception):
    pass


class _Parked(Exception):
    def __init__(self, why: str) -> None:
        self.why = why


class _Pacer:
    """The pause between one reconcile message's device calls (none before its first)."""

    def __init__(self, pace: float) -> None:
        self._pace = pace
        self._called = False

    async def next_call(self) -> None:
        if self._called:
            await asyncio.sleep(self._pace)
        self._called = True


class SyncWorker:
    def __init__(self, pool: asyncpg.Pool, queries: Queries, drivers: Drivers, deadlines: Deadlines,
                 gate: Callable[[Device], str | None], policy: Callable[[], tuple[RetryPolicy, float]],
                 tuning: ReconcileTuning, parking: ParkPolicy | None = None,
                 may_operate: Callable[[Device], bool] | None = None,
                 may_turn_off: Callable[[str, str], Awaitable[bool]] | None = None) -> None:
        self._pool = pool
        self._q = queries
        self._drivers = drivers
        self._deadlines = deadlines
        self._gate = gate
        self._policy = policy  # (retry policy, device timeout), read fresh: both are live settings
        self.tuning = tuning
        self._parking = parking or ParkPolicy()
        self._may_operate = may_operate or (lambda _d: True)  # the device claim still has room for a call
        self._may_turn_off = may_turn_off or _always  # the guard against mass suspension admits this repair
        # lets the commands waiting in the device's lane run now; the services they were for (the executor's)
        self.make_way: Callable[[Device], Awaitable[set[str]]] = _no_way

    def retry_delay(self, attempt: int) -> float:
        """The retry policy's backoff after this attempt (a live setting, read now)."""
        return self._policy()[0].delay(attempt)

    async def handle(self, w: SyncWork) -> Outcome:
        d, req, dev = w.delivery, w.request, w.device
        try:
            if why := self._gate(dev):
                raise _Parked(why)
            async with self._pool.acquire() as conn:
                rows = await conn.fetch(self._q.desired_for_sync, dev.id, req.service, req.run)
                # the query yields nothing for an unknown run: only then is it worth asking which it was
                if not rows and not await conn.fetchval(self._q.sync_target_exists, req.run, dev.id):
                    raise _Forged(f"reconcile message names run {req.run} for device {dev.id}, "
                                  "which no sync run holds (forged or pruned)")
            driver = self._drivers.get(dev.driver)
            pacer = _Pacer(self.tuning.pace)
            touched: set[str] = set()
            first = await self._read_all(driver, dev, [r["service"] for r in rows], pacer, touched)
            events: list[EventRow] = []
            states: list[StateUpdate] = []
            findings = []
            expected = {r["service"]: r["desired"] for r in rows}
            for row in rows:
                touched |= await self.make_way(dev)  # commands waiting for the device go first
                if touched:  # what they were for is judged by its desired state now, from a reading of its own
                    expected = await self._expected(w, expected)
                    for svc in touched:
                        first.pop(svc, None)
                    touched = set()
                if (want := expected.get(row["service"])) is None:
                    continue  # no desired state any more (its command was dead-lettered): not checked
                findings.append(await self._check(w, driver, row["service"], want, events, states,
                                                  pacer, first.get(row["service"])))
        except _Parked as p:
            if skip := self._skip(w, p.why):
                log.info("reconcile of %s not checked: %s", dev.id, skip, extra=_fields(w, "reconcile_not_checked"))
                return unknown_device(d, req, f"not checked: {skip}", skipped=skip)
            # back when the wait is over at the latest, to be reported then (not a whole backoff later)
            left = self.tuning.unreachable_wait - waited(d, time.time())
            delay = min(self._parking.delay(d.bounces), max(0.5, left))
            log.debug("reconcile parked for up to %.0fs: %s", delay, p.why, extra=_fields(w, "parked"))
            new = parklog.record(parklog.last_parked(d.headers), p.why)  # one event per reason, not per park
            return Outcome(d, "park", [self._event(w, "parked", None, error=p.why)] if new else [],
                           retry_delay=delay, reconcile=True, parked_reason=parklog.reason_code(p.why))
        except _Forged as exc:
            log.warning("dead-lettered: %s", exc, extra=_fields(w, "dead_lettered"))
            return Outcome(d, "dead_letter", [self._event(w, "dead_lettered", None, error=str(exc))],
                           reason=str(exc), error_kind="permanent", reconcile=True)
        except (PermanentError, ConfigError) as exc:  # e.g. its driver is gone: report, do not retry forever
            return unknown_device(d, req, str(exc))
        except (*DB_ERRORS, AgentError) as exc:
            policy, _ = self._policy()
            if policy.exhausted(d.attempt):  # bounded like commands: the run records it and goes on
                log.warning("reconcile of %s given up after %d attempts: %s", dev.id, d.attempt, exc,
                            extra=_fields(w, "reconcile_given_up"))
                return unknown_device(d, req, f"gave up after {d.attempt} attempts: {exc}")
            delay = policy.delay(d.attempt)
            log.warning("reconcile of %s will be retried in %.1fs: %s", dev.id, delay, exc,
                        extra=_fields(w, "retried"))
            return Outcome(d, "retry", [self._event(w, "retried", None, error=str(exc))], retry_delay=delay,
                           reconcile=True)
        events += await self._policy_problems(w, driver, [r["service"] for r in rows])
        result = summary(findings)
        log.debug("reconciled %s: %d checked, %d drifted, %d repaired, %d unreadable", dev.id, result["checked"],
                 result["drifted"], result["repaired"], result["unreadable"], extra=_fields(w, "reconciled"))
        return Outcome(d, "archive", events, sync={"run": req.run, "device": dev.id, **result}, extra_states=states,
                       reconcile=True)

    async def _expected(self, w: SyncWork, expected: dict[str, str]) -> dict[str, str]:
        """The desired states of the run's services, read again after commands ran in the middle of it
        (a service whose command was dead-lettered meanwhile has none: it is left out)."""
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(self._q.desired_for_sync, w.device.id, w.request.service, w.request.run)
        now = {r["service"]: r["desired"] for r in rows}
        return {svc: now[svc] for svc in expected if svc in now}

    async def _policy_problems(self, w: SyncWork, driver: Driver, services: list[str]) -> list[EventRow]:
        """A `policy_missing` event for each way the device's suspension policy blocks nobody (an
        address list no enabled firewall rule uses, ...), where the driver can tell. A check that
        fails is logged and left for the next run: it never fails the reconcile."""
        if not isinstance(driver, ChecksPolicy) or w.request.service is not None or not self._may_operate(w.device):
            return []  # (a run for one service checks that service only)
        _, timeout = self._policy()
        try:
            async with asyncio.timeout(timeout):
                problems = await driver.check_policy(w.device, services)
        except (AgentError, TimeoutError) as exc:
            log.warning("suspension policy of %s not checked: %s", w.device.id, exc,
                        extra=_fields(w, "policy_unchecked"))
            return []
        for problem in problems:
            log.warning("%s: %s", w.device.id, clean(problem, 500), extra=_fields(w, "policy_missing"))
        return [self._event(w, "policy_missing", None, error=clean(problem, 1000)) for problem in problems]

    def _skip(self, w: SyncWork, why: str) -> str | None:
        """Whether a reconcile the gate keeps from its device stops waiting (and why), or is parked."""
        if w.device.paused is not None:
            return why  # "paused: <the operator's reason>"; nothing to wait for until the operator resumes it
        return wait_over(w.delivery, why, self.tuning.unreachable_wait, time.time())

    async def _read_all(self, driver: Driver, dev: Device, services: list[str], pacer: _Pacer,
                        touched: set[str]) -> dict[str, Observation | AgentError]:
        """The first reading of every service, one request per READ_BATCH services (each under its
        own deadline), where the driver can; {} where it cannot (then each service is read on its
        own). A service the batch could not read is left out: it is read on its own, with the
        retries a single reading has. When a request fails as a whole, after those retries, each of
        its services is unreadable for that reason (as each one read on its own would have been,
        without a failing call per service)."""
        if len(services) < 2 or batch_reader(driver, dev) is None:
            return {}
        timeout = self._calls(dev).timeout
        out: dict[str, Observation | AgentError] = {}
        for at in range(0, len(services), READ_BATCH):  # each request under its own deadline
            chunk = services[at:at + READ_BATCH]

            async def read(chunk: list[str] = chunk) -> dict[str, Observation | AgentError]:
                self._claimed(dev)
                return await observe_many(driver, dev, chunk, timeout, self._deadlines)

            if at and (now := await self.make_way(dev)):  # commands first; what they changed is read again
                touched |= now
                for svc in now:
                    out.pop(svc, None)
            await pacer.next_call()
            try:
                found = await self._retrying(dev, read)
            except AgentError as exc:
                out.update(dict.fromkeys(chunk, exc))
                continue
            out.update({svc: obs for svc, obs in found.items() if isinstance(obs, Observation)})
        return {svc: obs for svc, obs in out.items() if svc not in touched}

    async def _check(self, w: SyncWork, driver: Driver, service: str, expected: str,
                     events: list[EventRow], states: list[StateUpdate], pacer: _Pacer,
                     first: Observation | AgentError | None = None) -> Finding:
        dev, dry = w.device, w.request.dry_run
        if isinstance(first, AgentError):  # the batch reading failed as a whole: no call of its own
            events.append(self._event(w, "unreadable", service, desired=expected, error=str(first)))
            return Finding(service, expected, None, "unreadable", str(first))
        readings: list[str] = []
        while True:
            try:
                if first is not None:
                    obs, first = first, None
                else:
                    await pacer.next_call()
                    obs = await self._retrying(dev, lambda: self._read(driver, dev, service))
            except AgentError as exc:
                events.append(self._event(w, "unreadable", service, desired=expected, error=str(exc)))
                return Finding(service, expected, readings[-1] if readings else None, "unreadable", str(exc))
            readings.append(obs.observed)
            if obs.observed == expected or needs_repair(expected, readings, self.tuning.confirm):
                break
            await asyncio.sleep(self.tuning.confirm_delay)  # a second reading must confirm the drift
        found = readings[-1]
        if found == expected:
            states.append(StateUpdate(dev.id, service, observed=found, observed_at=obs.observed_at,
                                      verified_at=obs.observed_at))  # a reading that matches verifies
            return Finding(service, expected, found, "in_sync")
        what = f"expected {expected}, found {found}"
        events.append(self._event(w, "drift", service, desired=expected, observed=found, error=what))
        states.append(StateUpdate(dev.id, service, observed=found, observed_at=obs.observed_at,
                                  error=f"drift: {what}"))
        log.debug("drift on %s/%s: %s%s", dev.id, service, what, " (dry run: left as it is)" if dry else "",
                    extra={**_fields(w, "drift"), "service": service})
        if dry:
            return Finding(service, expected, found, "drift")
        if expected == "off" and not await self._may_turn_off(dev.id, service):
            why = "held by the guard against mass suspension: not repaired (agentctl guard status)"
            events.append(self._event(w, "held", service, desired=expected, observed=found, error=why))
            return Finding(service, expected, found, "drift", why)
        started = time.monotonic()
        try:
            await pacer.next_call()
            fixed = await self._retrying(dev, lambda: self._converge(driver, dev, service, expected))  # type: ignore[arg-type]
        except AgentError as exc:
            events.append(self._event(w, "failed", service, desired=expected, observed=found, error=str(exc)))
            states.append(StateUpdate(dev.id, service, error=f"repair failed: {exc}"))
            return Finding(service, expected, found, "failed", str(exc))
        ms = round((time.monotonic() - started) * 1000, 3)
        events.append(self._event(w, "repaired", service, desired=expected, observed=fixed.observed,
                                  duration_ms=ms, error=what))
        states.append(StateUpdate(dev.id, service, observed=fixed.observed, observed_at=fixed.observed_at,
                                  applied_at=fixed.applied_at, verified_at=fixed.verified_at))
        log.debug("repaired %s/%s", dev.id, service, extra={**_fields(w, "repaired"), "service": service})
        return Finding(service, expected, found, "repaired")  # what it found; expected is what it is now

    async def _read(self, driver: Driver, dev: Device, service: str) -> Observation:
        self._claimed(dev)
        return await observe(driver, dev, service, self._calls(dev).timeout, self._deadlines)

    def _claimed(self, dev: Device) -> None:
        if not self._may_operate(dev):
            raise _Parked("the claim on the device ran short (database unreachable?)")

    async def _converge(self, driver: Driver, dev: Device, service: str, desired: State) -> Observation:
        """The repair: the converge commands use, under the same rules (`Calls`): the claim is asked
        before the first reading here, and before the write and the read-back by the operation."""
        self._claimed(dev)
        try:
            return await converge_one(driver, dev, service, desired, self._calls(dev))
        except ClaimShort:
            raise _Parked("the claim on the device ran short (database unreachable?)") from None

    def _calls(self, dev: Device) -> Calls:
        _, timeout = self._policy()

        async def claim(_seconds: float) -> bool:  # may_operate covers a whole operation, so any call of it
            return self._may_operate(dev)
        return Calls.of(dev, timeout, self._deadlines, claim)

    async def _retrying(self, dev: Device, op: Callable[[], Awaitable[T]]) -> T:
        """Transient failures are retried here with backoff; the gate turning red parks the message."""
        policy, _ = self._policy()
        attempt = 0
        while True:
            attempt += 1
            try:
                return await op()
            except PermanentError:
                raise
            except TransientError:
                if why := self._gate(dev):
                    raise _Parked(why) from None
                if policy.exhausted(attempt):
                    raise
            await asyncio.sleep(min(INLINE_DELAY_CAP, policy.delay(attempt)))

    def _event(self, w: SyncWork, kind: str, service: str | None, **kw: Any) -> EventRow:
        return EventRow(kind, w.device.id, service, w.delivery.msg_id, attempt=w.delivery.attempt,
                        meta={"run": w.request.run, "dry_run": w.request.dry_run}, **kw)


async def _always(_device: str, _service: str) -> bool:
    return True
async def _no_way(_device: Device) -> set[str]:
    return set()


def waited(d: Delivery, now: float) -> float:
    """Seconds since the message was fed, by the database's clock (as enqueued_at is); `now` is ours."""
    return now + d.skew - d.enqueued_at.timestamp()


def wait_over(d: Delivery, why: str, bound: float, now: float) -> str | None:
    """Pure: once a reconcile message has waited `bound` seconds since it was fed, the reason it is
    not checked; before that None (it is parked)."""
    seconds = waited(d, now)
    return f"unreachable for {seconds:.0f}s: {why}" if seconds >= bound else None


def unknown_device(d: Delivery, req: SyncRequest, why: str, skipped: str | None = None) -> Outcome:
    """A device that cannot be worked on at all (removed since the run was asked for, its driver
    gone, paused, unreachable for too long): reported as unreadable, and the run goes on."""
    finding = Finding("*", None, None, "unreadable", why)
    sync = {"run": req.run, "device": req.device, **summary([finding]), "skipped": skipped or why}
    return Outcome(d, "archive", sync=sync, reconcile=True)


def _fields(w: SyncWork, action: str) -> dict[str, Any]:
    return {"action": action, "device": w.device.id, "msg_id": w.delivery.msg_id, "run": w.request.run}
