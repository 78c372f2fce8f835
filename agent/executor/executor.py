"""The executor: one lane per device, one operation at a time on it, outcomes to the Reporter.

Ordering: every (device, service) remembers the version (first msg_id) of the newest command it
accepted. A delivery older than that is superseded without touching the device, also when it
is a retry that comes back late. Decisions come from policy.py; this module does the I/O.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime, timedelta, timezone
from functools import partial
from typing import Protocol, cast

from agent.drivers.registry import Drivers
from agent.errors import AgentError, ConfigError, NoAnswerError, PermanentError, TransientError
from agent.executor import budget, coalesce, parklog
from agent.executor.acceptor import Acceptor
from agent.executor.claims import DeviceClaims
from agent.executor.commands import Commands, Work, refused
from agent.executor.converge import Calls, Converged, Observation, VerifyError, call_timeout, converge, observe
from agent.executor.deadlines import Deadlines
from agent.executor.lanework import LaneItem
from agent.executor.policy import KeyState, ParkPolicy, RetryPolicy, Tuning, Verdict, decide
from agent.model.device import Device, State
from agent.model.headers import released
from agent.model.outcome import Delivery, EventRow, Outcome, StateUpdate

log = logging.getLogger("agent.executor")


class Outcomes(Protocol):
    """Where the executor sends each outcome (the queue's Reporter, which commits them in batches)."""

    def submit(self, outcome: Outcome) -> None: ...


class MoreWork(Protocol):
    """Where a lane asks for more of its device's waiting commands before a take (the queue's consumer,
    which hands the executor its work: the one loop between them, set with `Executor.ask_for_more`)."""

    async def top_up(self, device: str, room: int) -> None: ...


Said = tuple[Verdict, int, int | None] | TransientError  # what a command's acceptance said (verdict, version, ...)


class Executor:
    def __init__(self, acceptor: Acceptor, drivers: Drivers, reporter: Outcomes, tuning: Callable[[], Tuning],
                 concurrency: int, *, gate: Callable[[Device], str | None] | None = None,
                 on_unreachable: Callable[[Device], None] | None = None,
                 confirm: Callable[[Device, float], Awaitable[str | None]] | None = None,
                 parking: ParkPolicy | None = None, claims: DeviceClaims | None = None,
                 deadlines: Deadlines | None = None,
                 coalesce: int = 100) -> None:
        self._acceptor = acceptor
        self.gate: Callable[[Device], str | None] = gate or (lambda _d: None)
        self._on_unreachable = on_unreachable or (lambda _d: None)
        self.confirm: Callable[[Device, float], Awaitable[str | None]] = confirm or _proven
        self.claims = claims
        self._coalesce = coalesce  # commands of one device taken together at most
        self._more: MoreWork | None = None  # reads more of a device's waiting commands when its lane is served
        self._parking = parking or ParkPolicy()
        self._parked = parklog.ParkSummary()  # the summary line of parks, every few minutes at most
        self.deadlines = deadlines or Deadlines()
        self._drivers = drivers
        self._reporter = reporter
        self._tuning = tuning  # live: asked at each use
        self._slots = asyncio.Semaphore(concurrency)
        self._lanes: dict[str, deque[LaneItem]] = {}
        self._high: dict[str, int] = {}  # device -> high-priority commands in its lane (taken or waiting)
        self._tasks: set[asyncio.Task[None]] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self.busy_devices: set[str] = set()

    # -- intake ---------------------------------------------------------------------------

    def commands(self, max_bytes: int) -> Commands:
        """Commands as a kind of lane work (agent/executor/lanework.py), run here: the composition root
        registers it with the other kinds."""
        return Commands(self._process, self._broken, max_bytes)

    def submit(self, item: LaneItem) -> None:
        """A message joins its device's lane, after the work already there; its kind runs it there."""
        device_id = item.device.id
        lane = self._lanes.get(device_id)
        if lane is None:
            lane = self._lanes[device_id] = deque()
            self._idle.clear()
            task = asyncio.create_task(self._drain(device_id, lane), name=f"lane:{device_id}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        lane.append(item)
        if item.high:
            self._high[device_id] = self._high.get(device_id, 0) + 1

    def ask_for_more(self, source: MoreWork) -> None:
        """Fill each take from `source` while a backlog waits (device-fair reading: the consumer)."""
        self._more = source

    def postpone(self, delivery: Delivery, device_id: str, why: str) -> None:
        """Back to the queue for a moment without using an attempt (nothing was tried)."""
        log.info("postponed: %s", why, extra={"action": "postponed", "msg_id": delivery.msg_id, "device": device_id})
        out = Outcome(delivery, "park", retry_delay=random.uniform(1.0, 3.0), bounce=True, device=device_id)
        self._reporter.submit(out)

    def op_bound(self, device: Device) -> float:
        return op_bound(device, self._timeout)

    def settle(self, outcome: Outcome) -> None:
        """An outcome decided without a device operation goes straight to the reporter."""
        self._reporter.submit(outcome)

    def reject(self, delivery: Delivery, reason: str) -> None:
        """Dead-letter a message that cannot be worked on (refused before it is parsed), with the reason."""
        self._reporter.submit(refused(delivery, reason))

    @property
    def _policy(self) -> RetryPolicy:
        return self._tuning().policy

    @property
    def _timeout(self) -> float:
        return self._tuning().device_timeout

    async def idle(self) -> None:
        await self._idle.wait()

    # -- per device -----------------------------------------------------------------------

    async def _drain(self, device_id: str, lane: deque[LaneItem]) -> None:
        try:
            while lane:
                work = lane[0]
                if self.claims is not None and not await self.claims.claim(device_id, self.op_bound(work.device)):
                    self._bounce(lane)  # another agent is operating this device right now
                    break
                async with self._slots:
                    if self._more is not None and len(lane) < self._coalesce and lane[0].joins_take:
                        await self._more.top_up(device_id, self._coalesce - len(lane))  # a backlog: fill the take
                    self.busy_devices.add(device_id)
                    try:  # once a slot is ours: what came meanwhile joins
                        await self._serve(device_id, lane, list(lane))
                    finally:
                        self.busy_devices.discard(device_id)
        finally:
            del self._lanes[device_id]
            self._high.pop(device_id, None)
            if self.claims is not None:
                self.claims.release(device_id)
            if not self._lanes:
                self._idle.set()

    async def _serve(self, device_id: str, lane: deque[LaneItem], view: Sequence[LaneItem]) -> list[LaneItem]:
        """Run the lane's next take, chosen among `view` (the lane, or its commands alone), report what
        settled and take it out of the lane; a command the take yielded before writing stays in the
        lane, in its place. A take with no high-priority command yields between two writes to a
        high-priority command that arrived meanwhile (see `coalesce.pick`, which takes it next)."""
        take = coalesce.pick(view, self._coalesce)
        if take[0].joins_take:  # one command is a take of one: a single path for both
            works = cast(list[Work], take)  # only commands join a take
            urgent = None if any(w.high for w in works) else (lambda: self._high.get(device_id, 0) > 0)
            outcomes = await self._run_take(works, urgent)
        else:
            outcomes = [await self._run_item(take[0])]
        settled = [it for it, o in zip(take, outcomes) if o is not None]
        for it, o in zip(take, outcomes):
            if o is not None:
                o.urgent = it.high
                self._reporter.submit(o)
        if len(settled) < len(take):
            log.debug("take yields to a high-priority command: %d command(s) wait", len(take) - len(settled),
                      extra={"action": "yielded", "device": device_id})
        gone = {id(it) for it in settled}
        keep = [it for it in lane if id(it) not in gone]
        lane.clear()
        lane.extend(keep)
        if n := sum(it.high for it in settled):
            self._high[device_id] = self._high.get(device_id, 0) - n
        return settled

    async def make_way(self, device_id: str) -> set[str]:
        """Long lane work (a reconcile message, between two of its device calls) steps aside: the work
        waiting in its device's lane whose kind overtakes (commands) runs now, under the same slot and
        claim. Returns the services it was for (their state may have changed meanwhile)."""
        lane = self._lanes.get(device_id)
        services: set[str] = set()
        while lane is not None and (view := [it for it in lane if it.kind.overtakes]):
            services.update(svc for it in await self._serve(device_id, lane, view) if (svc := it.service))
        return services

    async def _run_item(self, work: LaneItem) -> Outcome:
        try:
            outcome = await work.kind.run(work)
        except Exception as exc:  # a bug must not strand the message: retry it, loudly
            outcome = self._internal_error(work, exc)
        outcome.driver, outcome.device = work.device.driver, work.device.id
        return outcome

    async def _run_take(self, works: list[Work], urgent: Callable[[], bool] | None = None) -> list[Outcome | None]:
        """Several commands for one device at once; a bug fails each of them the lane's last-resort way.
        None for a command the take yielded (`urgent`) before writing it: it stays in the lane."""
        try:
            outcomes = await self._process_take(works, urgent)
        except Exception as exc:
            outcomes = [self._internal_error(w, exc) for w in works]
        for o, w in zip(outcomes, works):
            if o is not None:
                o.driver, o.device = w.device.driver, w.device.id
        return outcomes

    async def _process_take(self, works: list[Work], urgent: Callable[[], bool] | None = None) -> list[Outcome | None]:
        """`set` commands for one device, one or many, judged in version order as if each ran alone:
        an expired one settles at once; the rest are accepted (in one flush) while the device is read
        once for all their services, so the acceptance round trip overlaps the read. The acceptance
        finds the duplicates of a request_id and the newest accepted version per key; an older
        command is superseded by that one only (never by a duplicate or an expired one), and
        nothing is written before it answers. The services that differ are written (up to the
        device's max_parallel at once); one more read verifies them all. Per command the rules
        stay: newest wins, verified read-back, retries, parking, claims, the VPN guard's last word."""
        outcomes: dict[int, Outcome | None] = {}
        p = coalesce.plan(works)
        for w in p.stale:
            outcomes[id(w)] = Outcome(w.delivery, "archive")  # fenced out: the newer delivery reports
        live: list[Work] = []
        for w in p.commands:
            now = datetime.now(timezone.utc) + timedelta(seconds=w.delivery.skew)
            if (v := decide(w.command, w.delivery.version, KeyState(), None, now)) is Verdict.CONVERGE:
                live.append(w)
            else:
                outcomes[id(w)] = self._skip(w, v, 0, None)
        if live:
            for w, o in zip(live, await self._converge_take(live, urgent)):
                outcomes[id(w)] = o
        return [outcomes[id(w)] for w in works]

    async def _converge_take(self, live: list[Work], urgent: Callable[[], bool] | None = None) -> list[Outcome | None]:
        device = live[0].device
        first = any(w.high for w in live)  # the whole take in one flush: newest-wins judges it together
        accepted = self._acceptor.submit_take([(w.command, w.delivery.version, w.delivery.msg_id,
                                                released(w.delivery.headers)) for w in live], first)

        async def verdicts() -> dict[int, Said]:
            try:
                answers = await accepted
            except TransientError as exc:
                return {id(w): exc for w in live}
            out: dict[int, Said] = {}
            now = datetime.now(timezone.utc)
            for w, (version, rid, held) in zip(live, answers):
                at = now + timedelta(seconds=w.delivery.skew) if w.delivery.skew else now
                out[id(w)] = (decide(w.command, w.delivery.version, KeyState(version, w.command.state), rid, at,
                                     held), version, rid)
            return out

        def settle(w: Work, said: Said, go: Callable[[], Outcome]) -> Outcome:
            if isinstance(said, TransientError):  # not judged: it may be a duplicate, or superseded
                return self._failed(w, said, 0.0, judged=False)
            if said[0] is Verdict.HELD:
                return self._held(w)
            return go() if said[0] is Verdict.CONVERGE else self._skip(w, *said)

        said: dict[int, Said]
        if why := self.gate(device):
            said = await verdicts()
            return [settle(w, said[id(w)], lambda w=w: self._park(w, why)) for w in live]  # type: ignore[misc]
        services = sorted({w.command.service for w in live})
        started, began = time.monotonic(), time.time()
        try:
            driver = self._drivers.get(device.driver)  # a driver that fails to load fails these commands
        except AgentError as exc:
            err = exc
            said = await verdicts()
            tunnel = await self._take_last_resort([(w, err) for w in live], began)
            return [settle(w, said[id(w)], partial(self._failed, w, err, _ms(started), tunnel.get(id(w))))
                    for w in live]
        said = {}
        going: list[Work] = []  # the commands their acceptance lets converge

        async def accepted_states() -> dict[str, State]:  # nothing is written before the acceptance answers
            said.update(await verdicts())
            going.extend(w for w in live if _converges(said[id(w)]))
            return {w.command.service: w.command.state for w in going}  # type: ignore[misc]

        done = await converge(driver, device, services, self._calls(device), accepted_states, urgent=urgent)
        ms = _ms(started)
        tunnel = await self._take_last_resort(
            [(w, e) for w in going if (e := done[w.command.service].silence())], began)
        went = {id(w) for w in going}  # a take of a hundred: asked per command, a scan of `going` was quadratic
        return [None if id(w) in went and done[w.command.service].left else
                settle(w, said[id(w)], lambda w=w: self._take_outcome(w, done[w.command.service], ms,  # type: ignore[misc]
                                                                      tunnel.get(id(w))))
                for w in live]

    async def _take_last_resort(self, failed: list[tuple[Work, AgentError]], began: float) -> dict[int, str]:
        """Commands of a take whose device call failed: if one of them is on its last attempt and
        got no answer, the VPN guard is asked once whether the tunnel was down; its reason then
        parks every command of the take that got no answer, instead of giving it up."""
        silent = [(w, e) for w, e in failed if isinstance(e, NoAnswerError)]
        last = next(((w, e) for w, e in silent if self._policy.exhausted(w.delivery.attempt)), None)
        why = await self._last_resort(last[0], last[1], began) if last else None
        return {id(w): why for w, _e in silent} if why else {}

    def _calls(self, device: Device) -> Calls:
        """The rules of a take's device calls: its deadline, max_parallel, and the device claim asked
        (and renewed if it ran short) before each write and the read-back."""
        claims = self.claims
        if claims is None:
            return Calls.of(device, self._timeout, self.deadlines)
        return Calls.of(device, self._timeout, self.deadlines, lambda need: claims.claim(device.id, need))

    def _take_outcome(self, w: Work, done: Converged, ms: float, unproven: str | None = None) -> Outcome:
        proof = done.proof()
        if isinstance(proof, Observation):
            return self._converge(w, proof, ms)
        if isinstance(proof, VerifyError):
            return self._failed(w, proof, ms)
        failed = self._failed(w, proof, ms, unproven)
        if isinstance(done.applied, float):  # written, but not read back: the failed event says so
            ended = [ev for ev in failed.events if ev.kind == "failed"]
            for ev in ended:
                ev.applied_at = done.applied
            if not ended:  # a repeated park records no failure: the write gets a row of its own
                failed.events.insert(0, self._event(w, "applied", applied_at=done.applied))
            if failed.state is not None:
                failed.state.applied_at = done.applied
        return failed

    def _internal_error(self, work: LaneItem, exc: Exception) -> Outcome:
        """The lane's last resort: it cannot raise, so no message is ever left leased without an outcome."""
        try:
            log.exception("internal error", extra=_fields(work, "internal_error"))
            return work.kind.internal_error(work, exc)
        except Exception:  # even building the failure failed: retry the message plainly, later
            return Outcome(work.delivery, "retry", retry_delay=60.0, reconcile=work.kind.reconcile)

    def _broken(self, w: Work, exc: Exception) -> Outcome:
        """A command whose run hit a bug: failed like a transient error (retried, then dead-lettered)."""
        return self._failed(w, TransientError(f"internal error: {exc!r}"), 0.0)

    def _bounce(self, lane: deque[LaneItem]) -> None:
        """Back to the queue for a moment, not counted as an attempt; the claim is tried again then."""
        log.debug("device busy on another agent", extra=_fields(lane[0], "device_busy"))
        self._high.pop(lane[0].device.id, None)
        while lane:
            w = lane.popleft()
            out = Outcome(w.delivery, "park", retry_delay=random.uniform(0.3, 1.0), bounce=True,
                          reconcile=w.kind.reconcile)
            out.driver, out.device = w.device.driver, w.device.id
            self._reporter.submit(out)

    async def _process(self, w: Work) -> Outcome:
        d, cmd = w.delivery, w.command
        now = datetime.now(timezone.utc) + timedelta(seconds=d.skew)  # the database's clock judges not_after
        verdict = decide(cmd, d.version, KeyState(), None, now)
        if verdict is Verdict.CONVERGE:
            return (await self._process_take([w]))[0]  # type: ignore[return-value]  # never yields: no `urgent`
        if verdict is Verdict.REFRESH:
            if why := self.gate(w.device):
                return self._park(w, why)
            return await self._run(w, self._refresh)
        return self._skip(w, verdict, 0, None)

    def _park(self, w: Work, why: str) -> Outcome:
        """The device is unreachable through the VPN: wait for it, without using up an attempt. The
        event and the INFO line only when the message was not parked for this kind of reason last."""
        delay, code = self._parking.delay(w.delivery.bounces), parklog.reason_code(why)
        first = parklog.record(parklog.last_parked(w.delivery.headers), why)
        log.log(logging.INFO if first else logging.DEBUG, "parked for up to %.0fs: %s", delay, why,
                extra=_fields(w, "parked"))
        if line := self._parked.note(w.delivery.msg_id, w.command.device, code, time.monotonic()):
            log.info(line, extra={"action": "parked_summary"})
        state = StateUpdate(w.command.device, w.command.service, error=f"parked: {why}", msg_id=w.delivery.msg_id)
        return Outcome(w.delivery, "park", [self._event(w, "parked", error=why)] if first else [], state,
                       retry_delay=delay, parked_reason=code)

    def _held(self, w: Work) -> Outcome:
        """One `off` too many for the guard: kept in the queue, invisible, until an operator releases or
        discards it (`agentctl guard`); not an attempt, never retried or dead-lettered meanwhile."""
        log.info("held: the guard against mass suspension holds this off", extra=_fields(w, "held"))
        note = "held by the guard against mass suspension: agentctl guard status"
        return Outcome(w.delivery, "hold", [self._event(w, "held", error=note)])

    def _skip(self, w: Work, verdict: Verdict, version: int, rid_version: int | None) -> Outcome:
        d, cmd = w.delivery, w.command
        note = {Verdict.SUPERSEDED: f"version {version} is newer",
                Verdict.DUPLICATE: f"request_id already carried by version {rid_version}",
                Verdict.EXPIRED: f"not_after {cmd.not_after} passed"}[verdict]
        log.info("%s: %s", verdict.value, note, extra=_fields(w, verdict.value))
        return Outcome(d, "archive", [self._event(w, verdict.value, error=note)])

    async def _run(self, w: Work, op) -> Outcome:  # type: ignore[no-untyped-def]
        started, began = time.monotonic(), time.time()
        try:
            driver = self._drivers.get(w.device.driver)
            return op(w, await self._device_op(w, driver), _ms(started))
        except AgentError as exc:
            return self._failed(w, exc, _ms(started), await self._last_resort(w, exc, began))

    async def _last_resort(self, w: Work, exc: AgentError, began: float) -> str | None:
        """Before the last attempt of a device that did not answer is given up: was it the device,
        or a tunnel outage not detected yet? A reason to park instead, or None (VPN guard decides)."""
        if not isinstance(exc, NoAnswerError) or not self._policy.exhausted(w.delivery.attempt) or self.gate(w.device):
            return None
        return await self.confirm(w.device, began)

    async def _device_op(self, w: Work, driver) -> Observation:  # type: ignore[no-untyped-def]
        return await observe(driver, w.device, w.command.service, call_timeout(w.device, self._timeout),
                             self.deadlines)

    def _converge(self, w: Work, obs: Observation, ms: float) -> Outcome:
        d, cmd = w.delivery, w.command
        # one row: the write (if one was needed) is the verified event's applied_at (schema 17)
        events = [self._event(w, "verified", observed=obs.observed, duration_ms=ms, applied_at=obs.applied_at)]
        if log.isEnabledFor(logging.INFO):  # the line's fields cost more than the rest of this at month-end
            log.info("verified", extra=_fields(w, "verified", changed=obs.applied_at is not None, duration_ms=ms))
        state = StateUpdate(cmd.device, cmd.service, cmd.state, d.version, obs.observed, obs.observed_at,
                            obs.applied_at, obs.verified_at, None, d.msg_id, cmd.request_id, cmd.meta)
        return Outcome(d, "archive", events, state)

    def _refresh(self, w: Work, obs: Observation, ms: float) -> Outcome:
        d, cmd = w.delivery, w.command
        log.info("refreshed", extra=_fields(w, "refreshed", observed=obs.observed))
        state = StateUpdate(cmd.device, cmd.service, observed=obs.observed, observed_at=obs.observed_at,
                            msg_id=d.msg_id, request_id=cmd.request_id)
        return Outcome(d, "archive", [self._event(w, "refreshed", observed=obs.observed, duration_ms=ms)], state)

    def _failed(self, w: Work, exc: AgentError, ms: float, unproven: str | None = None, *,
                judged: bool = True) -> Outcome:
        """A failed attempt: retried, parked or dead-lettered. Its desired state is recorded only if
        its acceptance judged it (`judged`): a command whose acceptance did not answer may be a
        duplicate or superseded, and its desire must not stand as the newest."""
        d, cmd = w.delivery, w.command
        attempt = d.attempt
        events = [self._event(w, "failed", error=str(exc), duration_ms=ms, observed=getattr(exc, "observed", None),
                              applied_at=exc.applied_at if isinstance(exc, VerifyError) else None)]
        desire = cmd.action == "set" and judged
        state = StateUpdate(cmd.device, cmd.service, cmd.state if desire else None, d.version if desire else None,
                            error=f"{exc.kind}: {exc}", msg_id=d.msg_id, request_id=cmd.request_id, meta=cmd.meta)
        if isinstance(exc, VerifyError):
            state.observed, state.observed_at = exc.observed, time.time()
            state.applied_at = exc.applied_at
        if isinstance(exc, NoAnswerError):
            self._on_unreachable(w.device)  # no answer at all: one of the VPN guard's signals
        if isinstance(exc, ConfigError):
            return self._misconfigured(w, exc, events)
        if isinstance(exc, TransientError) and (why := self.gate(w.device) or unproven):
            parked = self._park(w, f"{why} ({exc})")
            parked.events[:0] = events
            return parked
        if isinstance(exc, TransientError) and not self._policy.exhausted(attempt):
            delay = self._policy.delay(attempt)
            events.append(self._event(w, "retried", error=f"retry in {delay:.1f}s"))
            log.warning("retry in %.1fs: %s", delay, exc, extra=_fields(w, "retried", attempt=attempt))
            return Outcome(d, "retry", events, state, retry_delay=delay)
        reason = str(exc) if isinstance(exc, PermanentError) else f"gave up after {attempt} attempts: {exc}"
        events.append(self._event(w, "dead_lettered", error=reason))
        state.failed = desire  # reconciliation must not apply it later
        log.error("dead-lettered: %s", reason, extra=_fields(w, "dead_lettered", attempt=attempt))
        return Outcome(d, "dead_letter", events, state, reason=reason, error_kind=exc.kind)

    def _misconfigured(self, w: Work, exc: ConfigError, events: list[EventRow]) -> Outcome:
        """The device's setup is wrong (a credential it refuses, an option it cannot use): retrying cannot fix
        it and only the operator can, so the command waits for that, parked without using up an attempt
        (tried again, backing off to once a minute: it goes through once the setting is fixed), never dead-lettered.
        The failure, its event and the `device_misconfigured` line only when first parked for it."""
        why = f"device_misconfigured: {exc}"
        first = parklog.record(parklog.last_parked(w.delivery.headers), why)
        if first:
            log.error("%s", why, extra=_fields(w, "device_misconfigured"))
        parked = self._park(w, why)
        if first:
            parked.events[:0] = events
        return parked

    def _event(self, w: Work, kind: str, **kw) -> EventRow:  # type: ignore[no-untyped-def]
        d, cmd = w.delivery, w.command
        return EventRow(kind, cmd.device, cmd.service, d.msg_id, d.version, cmd.request_id,
                        cmd.state, attempt=d.attempt, meta=cmd.meta, **kw)


async def _proven(_device: Device, _since: float) -> str | None:
    return None


def op_bound(device: Device, timeout: float) -> float:
    """The longest one work item may operate the device: three calls, each under its deadline
    (AGENT_DEVICE_TIMEOUT: `timeout`) after its turn in the device's max_rate."""
    return 3 * (call_timeout(device, timeout) + budget.pace(device)) + 2.0


def _converges(said: Said) -> bool:
    return not isinstance(said, TransientError) and said[0] is Verdict.CONVERGE


def _ms(started: float) -> float:
    return round((time.monotonic() - started) * 1000, 3)


def _fields(w: LaneItem, action: str, **extra) -> dict:  # type: ignore[no-untyped-def]
    return {"action": action, **w.identities, **extra}
