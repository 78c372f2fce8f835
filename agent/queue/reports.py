"""Outcomes of deliveries, and the Reporter that commits them in batches.

One transaction per batch holds, for every message in it, the state report, the event rows
and the PGMQ archive (or DLQ move, or retry delay). Group commit is what lets the pipeline
move thousands of commands a second without giving up that atomicity.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import fields
from datetime import datetime, timezone
from typing import Any, Literal

import asyncpg

from agent.db.queries import Queries
from agent.model.outcome import LEAVES, EventRow, Outcome, StateUpdate
from agent.text import clean, clean_opt, safe_json, strict_json

log = logging.getLogger("agent.reporter")


def merge_states(updates: Sequence[StateUpdate]) -> list[StateUpdate]:
    """One row per (device, service), later updates winning field by field; desired by version. In
    key order: two reports at once (two writers, two agents) and the acceptance lock the state rows
    they share in the same order, so they wait for each other instead of deadlocking."""
    merged: dict[tuple[str, str], StateUpdate] = {}
    for upd in updates:
        key = (upd.device, upd.service)
        prev = merged.get(key)
        if prev is None:
            merged[key] = upd  # the outcome is settled: its update may be folded into in place
            continue
        for f in fields(StateUpdate):
            value = getattr(upd, f.name)
            if value is not None and f.name not in ("desired", "version"):
                setattr(prev, f.name, value)
        if upd.desired is not None and (upd.version or 0) >= (prev.version or 0):
            prev.desired, prev.version = upd.desired, upd.version
        if upd.verified_at is not None and upd.error is None:
            prev.error = None
    return [merged[key] for key in sorted(merged)]


def dlq_headers(o: Outcome, queue: str, agent_id: str) -> dict[str, Any]:
    return safe_json({
        "reason": clean_opt(o.reason, 2000),
        "error_kind": o.error_kind,
        "origin_msg_id": o.delivery.version,
        "origin_queue": queue,
        "delivered": o.delivery.read_ct,
        "attempts": o.delivery.attempt,
        "dead_lettered_at": datetime.now(timezone.utc).isoformat(),
        "agent_id": agent_id,
    })


async def write_batch(conn: asyncpg.Connection, q: Queries, agent_id: str, batch: Sequence[Outcome],
                      archive: bool = True) -> set[int]:
    """Commit one batch in one statement; return the msg_ids whose lease was lost. `archive`: keep
    settled messages in PGMQ's archive (else they are deleted, the audit being agent.events)."""
    args = report_args(q, agent_id, batch)
    if not any(o.sync is not None for o in batch):  # commands only: one statement
        row = await conn.fetchrow(q.report, *args, archive, q.queue)
    else:  # a reconcile run's devices: whether the run is finished is a statement of its own
        async with conn.transaction():
            row = await conn.fetchrow(q.report, *args, archive, q.queue)
            if row["runs"]:
                await conn.execute(q.finish_runs, row["runs"].split(","))
    return {o.delivery.msg_id for o in batch if o.finish in LEAVES} - _ids(row["left_queue"])


def _ids(listed: str) -> set[int]:
    """The msg_ids a report statement lists ("1,2,3"). Lists of bigint arrive as text: asyncpg
    knows an int8[] only after asking the server about it, three round trips and a catalog query
    on every new pooled connection, in the middle of the burst that opened it."""
    return {int(x) for x in listed.split(",")} if listed else set()


def report_args(q: Queries, agent_id: str, batch: Sequence[Outcome]) -> tuple[Any, ...]:
    """The report statement's parameters. Raises ValueError for a value that cannot be JSON."""
    finish = [{"id": o.delivery.msg_id, "rc": o.delivery.read_ct, "dest": o.move_to,
               "h": dlq_headers(o, q.queue, agent_id) if o.finish == "dead_letter" else None}
              for o in batch if o.finish in LEAVES]
    later = [{"id": o.delivery.msg_id, "rc": o.delivery.read_ct, "delay": _delay(o.retry_delay),
              "park": o.finish in ("park", "hold"), "hold": o.finish == "hold",
              "bounces": min(o.delivery.bounces + 1, MAX_BOUNCES),
              "reason": o.parked_reason if o.finish == "park" else ""}  # a retry clears it; None keeps it
             for o in batch if o.finish in ("retry", "park", "hold")]
    states = merge_states([s for o in batch for s in ([o.state] if o.state else []) + o.extra_states])
    events = [e for o in batch for e in o.events]
    synced = [{"msg_id": o.delivery.msg_id, **o.sync} for o in batch if o.sync is not None and o.finish == "archive"]
    return (strict_json(finish), q.dlq, strict_json(later), _columns(states, _STATE_COLUMNS),
            _columns(events, _EVENT_COLUMNS), agent_id, strict_json(synced))


MAX_BOUNCES = 1_000_000
_TEXT_FIELDS = ("error", "request_id", "observed", "desired")


def _delay(seconds: float) -> float:
    """A retry or park delay Postgres can take: finite, between 0 and a day."""
    return min(max(seconds, 0.0), 86400.0) if math.isfinite(seconds) else 60.0


# The columns of the states and events, in the order the report statement reads them: each table
# goes as one JSON array of columns, [[device, ...], [service, ...], ...]. Lists of plain values
# are what a JSON encoder encodes fastest, and Postgres reads each column with one set-returning
# function; the same rows as JSON objects (their keys repeated in every row) cost three times as
# much to encode, and as arrays of each type (asyncpg checks every element) more still.
_STATE_COLUMNS = ("device", "service", "desired", "version", "observed", "observed_at", "applied_at", "verified_at",
                  "error", "msg_id", "request_id", "meta", "failed")
_EVENT_COLUMNS = ("device", "service", "kind", "msg_id", "version", "request_id", "desired", "observed", "attempt",
                  "duration_ms", "error", "meta", "applied_at")


def _columns(rows: Sequence[Any], names: Sequence[str]) -> str:
    """Dataclass rows as one JSON array of columns (times as unix seconds); text that came from a
    message or a device is bounded and escaped on its way (strict JSON: see strict_json)."""
    cols = [[getattr(r, name) for r in rows] for name in names]
    for name, col in zip(names, cols):
        if name in _TEXT_FIELDS:
            for i, value in enumerate(col):
                # printable text within the bound is what clean() would return unchanged
                if isinstance(value, str) and not (len(value) <= 2000 and value.isprintable()):
                    col[i] = clean(value, 2000)
    return strict_json(cols)


class Settling:
    """Between a report's commit and its callback the consumer must not extend leases (a settled
    retry's delay would be overwritten): report writes that leave messages in the queue (retry, park,
    hold) hold this shared, any number at once; a lease extension holds it alone, and once it waits,
    new such writes wait behind it (it is never starved). A write that only takes messages out of the
    queue (archived, dead-lettered, moved) needs no fence: an extension finds no row of theirs."""

    def __init__(self) -> None:
        self._writes = 0
        self._alone = False
        self._changed = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def shared(self) -> AsyncIterator[None]:
        async with self._changed:
            await self._changed.wait_for(lambda: not self._alone)
            self._writes += 1
        try:
            yield
        finally:
            async with self._changed:
                self._writes -= 1
                self._changed.notify_all()

    @contextlib.asynccontextmanager
    async def alone(self) -> AsyncIterator[None]:
        async with self._changed:
            await self._changed.wait_for(lambda: not self._alone)
            self._alone = True
        try:  # from here on, however it ends (cancelled while waiting too), the writes are let in again
            async with self._changed:
                await self._changed.wait_for(lambda: self._writes == 0)
            yield
        finally:
            async with self._changed:
                self._alone = False
                self._changed.notify_all()


class Reporter:
    """Collects outcomes and commits them in batches, up to `writers` batches at once (each on a
    connection of its own: while Postgres executes one batch, the next is encoded and sent, and a
    month-end backlog of outcomes does not wait on one statement at a time). Two batches never hold
    the same outcome; what they share (a key's state row) is settled by the report statement's rules,
    as between two agents of one site.

    A write the database cannot take right now (down, failing over, a row locked past lock_timeout:
    `report_failure`) is retried, then its outcomes wait and are submitted again, for up to
    `give_up_after` seconds: an applied and verified command is recorded as such once the database
    is back, never dead-lettered for it. Only an outcome whose data the database refuses is
    dead-lettered, once it stands alone and was refused a second time."""

    def __init__(self, pool: asyncpg.Pool, queries: Queries, agent_id: str,
                 on_committed: Callable[[list[Outcome], set[int]], None],
                 max_batch: int = 1000, on_failed: Callable[[str], None] | None = None,
                 archive: bool = True, give_up_after: float = 60.0, writers: int = 2) -> None:
        self._pool = pool
        self._writers = max(1, writers)
        self._writing = 0  # batches being committed now
        self._archive = archive  # AGENT_ARCHIVE
        self._q = queries
        self._agent_id = agent_id
        self._on_committed = on_committed
        self._on_failed = on_failed or (lambda _why: None)  # a report write failed: "unavailable" or "refused"
        self._max_batch = max_batch
        self._give_up_after = give_up_after
        self._pending: list[Outcome] = []
        self._waiting: dict[int, float] = {}  # id(outcome) -> when its report first found the database unavailable
        self._deferred = 0  # outcomes waiting to be submitted again
        self._quieted = 0  # failure lines logged at debug since the first warning of this outage
        self._outage = False  # a write failed and none has committed since: repeats are not warnings
        self._expire_after = 0.0  # monotonic time before which a read-only refusal does not reconnect the pool again
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self.flushes = 0
        self.settling = Settling()  # held (shared) from a batch's write to its callback (lease extension waits)

    def submit(self, outcome: Outcome) -> None:
        self._pending.append(outcome)
        self._idle.clear()
        self._wake.set()

    async def drained(self) -> None:
        """Return once every submitted outcome was committed (or given up)."""
        await self._idle.wait()

    async def run(self) -> None:
        try:
            async with asyncio.TaskGroup() as writers:
                for _ in range(self._writers):
                    writers.create_task(self._writer())
        except ExceptionGroup as group:  # a writer's bug: raised as itself, for the log to name it
            raise group.exceptions[0] from None

    async def _writer(self) -> None:
        while True:
            while not self._pending:
                if not self._writing and not self._deferred:
                    self._idle.set()
                await self._wake.wait()
                self._wake.clear()
            batch = self._next_batch()
            self._writing += 1
            try:
                await self._commit(batch)
            finally:
                self._writing -= 1
            if self._pending:
                self._wake.set()  # a writer waiting takes the next batch

    def _next_batch(self) -> list[Outcome]:
        if any(o.urgent for o in self._pending):  # restores first: a small statement of their own
            urgent = [o for o in self._pending if o.urgent]
            self._pending = [o for o in self._pending if not o.urgent]
            batch = urgent[: self._max_batch]
            self._pending[:0] = urgent[self._max_batch:]
            return batch
        batch, self._pending = self._pending[: self._max_batch], self._pending[self._max_batch:]
        return batch

    async def _commit(self, batch: list[Outcome]) -> None:
        """Commit a batch. Unavailable: split it when one row of it may be the cause (a lock, a
        refusal not for its data), so the others commit, else let it wait and try again. Refused
        data: split it until the outcome refused stands alone, so every other one commits, and
        dead-letter that one with the reason."""
        self.flushes += 1
        try:
            await self._write(batch)
        except _Unavailable as exc:
            if len(batch) > 1 and exc.split:
                half = len(batch) // 2
                await self._commit(batch[:half])
                await self._commit(batch[half:])
                return
            await self._wait(batch, exc)
        except _Rejected as exc:
            if len(batch) > 1:
                half = len(batch) // 2
                await self._commit(batch[:half])
                await self._commit(batch[half:])
                return
            await self._refused_alone(batch[0], exc)

    async def _refused_alone(self, outcome: Outcome, first: _Rejected) -> None:
        """One outcome whose data was refused: tried once more alone before it is dead-lettered."""
        log.warning("outcome refused by the database: trying it once more alone", extra={
            "action": "report_refused", "msg_id": outcome.delivery.msg_id, "error": clean(first.reason)})
        try:
            await self._write([outcome])
        except _Unavailable as exc:
            await self._wait([outcome], exc)
        except _Rejected as exc:
            await self._poisoned(outcome, exc.reason)

    async def _wait(self, batch: list[Outcome], exc: _Unavailable) -> None:
        """Outcomes the database could not take now: submitted again after a pause that grows with
        how long they have waited; after give_up_after, given up (their messages are delivered again
        once their lease runs out, and redone)."""
        now = time.monotonic()
        keep: list[Outcome] = []
        expired: list[Outcome] = []
        for o in batch:
            since = self._waiting.setdefault(id(o), now)
            (expired if now - since >= self._give_up_after else keep).append(o)
        if expired:
            for o in expired:
                del self._waiting[id(o)]
            log.error("reports given up: their messages will be redelivered after the visibility timeout",
                      extra={"action": "report_given_up", "batch": len(expired), "error": clean(exc)})
            async with self.settling.shared():
                self._on_committed(expired, {o.delivery.msg_id for o in expired})
        if keep:
            pause = min(5.0, max(0.5, now - min(self._waiting[id(o)] for o in keep)))
            self._outage_line("reports wait for the database", {
                "action": "report_waiting", "batch": len(keep), "retry_in": round(pause, 1), "error": clean(exc)})
            self._deferred += len(keep)
            asyncio.get_running_loop().call_later(pause, self._resubmit, keep)

    def _outage_line(self, message: str, extra: dict[str, Any]) -> None:
        """A failed or waiting write: a warning the first time in an outage, debug after that (every
        batch retries on its own, and an operator needs to know the database is gone, not each retry)."""
        if self._outage:
            self._quieted += 1
            log.debug(message, extra=extra)
        else:
            self._outage = True
            log.warning(f"{message} (repeats are logged at debug until a report commits)", extra=extra)

    def _outage_over(self) -> None:
        if self._outage:
            log.info("reports commit again", extra={"action": "report_resumed", "quieted": self._quieted})
            self._outage, self._quieted = False, 0

    def _resubmit(self, batch: list[Outcome]) -> None:
        self._deferred -= len(batch)
        self._pending.extend(batch)
        self._idle.clear()
        self._wake.set()

    async def _poisoned(self, outcome: Outcome, why: str) -> None:
        """An outcome Postgres refuses: dead-letter its message with the reason instead; if even that
        is refused, leave the message for a later delivery (it blocks nothing meanwhile)."""
        d = outcome.delivery
        reason = clean(f"its outcome could not be recorded: {why}", 1000)
        log.error("outcome refused by the database: dead-lettering", extra={
            "action": "report_refused", "msg_id": d.msg_id, "error": reason})
        ev = EventRow("dead_lettered", msg_id=d.msg_id, version=d.version, attempt=d.attempt, error=reason)
        dead = Outcome(d, "dead_letter", [ev], reason=reason, error_kind="permanent",
                       driver=outcome.driver, device=outcome.device, reconcile=outcome.reconcile)
        try:
            await self._write([dead], forget=[outcome])
        except (_Unavailable, _Rejected) as exc:
            log.error("dead letter refused too: the message stays queued for a later attempt",
                      extra={"action": "report_given_up", "msg_id": d.msg_id, "error": clean(exc)})
            self._waiting.pop(id(outcome), None)
            async with self.settling.shared():
                self._on_committed([dead], {d.msg_id})

    async def _write(self, batch: list[Outcome], forget: Sequence[Outcome] = ()) -> None:
        """One batch, tried up to three times while the database is unavailable (once in an outage: see
        _outage_line); once committed, its
        callback (under `settling`, taken for each try and not across the pauses). Raises _Rejected
        when Postgres (or the encoding before it) refuses the batch's data, _Unavailable otherwise."""
        delay = 0.2
        # in an outage one try, then the batch waits its growing pause: retrying each batch three
        # times at once would be a connection storm against a database that is gone or read-only
        tries = 1 if self._outage else 3
        fenced = any(o.finish not in LEAVES for o in batch)  # a retry's or a park's vt must not be extended
        for attempt in range(1, tries + 1):
            async with self.settling.shared() if fenced else contextlib.nullcontext():
                try:
                    async with self._pool.acquire() as conn:
                        lost = await write_batch(conn, self._q, self._agent_id, batch, self._archive)
                except Exception as exc:
                    failed: Exception | None = exc
                else:
                    failed = None
                    if lost:
                        log.warning("lease lost: another reader took these messages",
                                    extra={"action": "lease_lost", "msg_ids": sorted(lost)})
                    for o in (*batch, *forget):
                        self._waiting.pop(id(o), None)
                    self._on_committed(batch, lost)
                    self._outage_over()
            if failed is None:
                return
            kind = report_failure(failed)
            if kind is None:
                raise failed
            said = f"{type(failed).__name__}: {failed}"
            if kind == "data":
                self._on_failed("refused")
                raise _Rejected(said) from failed
            self._on_failed(kind)
            self._outage_line("report failed, will retry", {
                "action": "report_failed", "error": clean(said), "attempt": attempt, "batch": len(batch)})
            if isinstance(failed, asyncpg.ReadOnlySQLTransactionError) and time.monotonic() >= self._expire_after:
                # a demoted primary: connect anew (to the new one); once per few seconds, not per batch,
                # or a failover becomes a storm of connections to a server that refuses writes anyway
                self._expire_after = time.monotonic() + 5.0
                await self._pool.expire_connections()
            if attempt < tries:
                await asyncio.sleep(delay)
                delay *= 2
        raise _Unavailable(said, kind == "refused" or (isinstance(failed, asyncpg.PostgresError)
                                                      and failed.sqlstate in ROW_WAITS))


# What a failed report write says, by SQLSTATE class: the database is not available right now
# (connection lost, failover, out of resources, a lock or statement timeout, a serialization
# failure or deadlock), or it refuses the data (a value out of range, a constraint, a limit).
UNAVAILABLE_CLASSES = ("08", "40", "53", "55", "57", "58")
UNAVAILABLE_STATES = ("25006",)  # read_only_sql_transaction: a demoted primary, mid-failover
DATA_CLASSES = ("22", "23", "54")
# What one row of a batch can cause (as can a refusal: a row-level security policy, a trigger): split
# the batch, so that the rest commits.
ROW_WAITS = ("55P03", "57014", "40P01", "40001")


def report_failure(exc: BaseException) -> Literal["unavailable", "data", "refused"] | None:
    """What a failed report write means for its outcomes (pure). "unavailable": the database cannot
    take them now, retry; "data": it refuses their content (or they cannot be encoded), find the one
    refused and dead-letter it; "refused": another refusal (a privilege, a trigger), retry and never
    dead-letter a command for it. None: not a database error (a bug: let it raise)."""
    if isinstance(exc, asyncpg.exceptions._base.DataError):  # asyncpg could not encode a parameter
        return "data"
    if isinstance(exc, asyncpg.PostgresError):
        state = exc.sqlstate or ""
        if state[:2] in DATA_CLASSES:
            return "data"
        if state[:2] in UNAVAILABLE_CLASSES or state in UNAVAILABLE_STATES:
            return "unavailable"
        return "refused"
    if isinstance(exc, (TimeoutError, OSError, asyncpg.InterfaceError, asyncpg.InternalClientError)):
        return "unavailable"
    if isinstance(exc, (ValueError, TypeError)):
        return "data"
    return None


class _Rejected(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _Unavailable(Exception):
    def __init__(self, reason: str, split: bool = False) -> None:
        super().__init__(reason)
        self.split = split  # one outcome of the batch may be the cause
