"""Outcomes of deliveries, and the Reporter that commits them in batches.

One transaction per batch holds, for every message in it, the state report, the event rows
and the PGMQ archive (or DLQ move, or retry delay). Group commit is what lets the pipeline
move thousands of commands a second without giving up that atomicity.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from typing import Any, Literal

import asyncpg

from agent.db.queries import Queries

log = logging.getLogger("agent.reporter")

Finish = Literal["archive", "retry", "park", "dead_letter"]


@dataclass
class Delivery:
    """A message as pgmq.read returned it."""

    msg_id: int
    read_ct: int
    enqueued_at: datetime
    raw: str
    headers: str | None
    version: int
    bounces: int = 0  # times it was parked: those deliveries were not attempts
    received: float = field(default_factory=time.monotonic)

    @property
    def attempt(self) -> int:
        return max(1, self.read_ct - self.bounces)


@dataclass
class StateUpdate:
    device: str
    service: str
    desired: str | None = None
    version: int | None = None
    observed: str | None = None
    observed_at: float | None = None   # unix times
    applied_at: float | None = None
    verified_at: float | None = None
    error: str | None = None
    msg_id: int | None = None
    request_id: str | None = None
    meta: dict[str, Any] | None = None


@dataclass
class EventRow:
    kind: str
    device: str | None = None
    service: str | None = None
    msg_id: int | None = None
    version: int | None = None
    request_id: str | None = None
    desired: str | None = None
    observed: str | None = None
    attempt: int | None = None
    duration_ms: float | None = None
    error: str | None = None
    meta: dict[str, Any] | None = None


@dataclass
class Outcome:
    delivery: Delivery
    finish: Finish
    events: list[EventRow] = field(default_factory=list)
    state: StateUpdate | None = None
    retry_delay: float = 0.0
    reason: str | None = None          # dead-letter reason, for people
    error_kind: str | None = None
    driver: str | None = None
    device: str | None = None
    bounce: bool = False               # back to the queue because its device was busy elsewhere
    sync: dict[str, Any] | None = None  # a reconcile message's findings (agent.sync_items, run counters)
    extra_states: list[StateUpdate] = field(default_factory=list)  # a reconcile reports several services
    reconcile: bool = False            # the outcome of a reconcile message, not of a command


def merge_states(updates: Sequence[StateUpdate]) -> list[StateUpdate]:
    """One row per (device, service), later updates winning field by field; desired by version."""
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
    return list(merged.values())


def dlq_headers(o: Outcome, queue: str, agent_id: str) -> str:
    return json.dumps({
        "reason": o.reason,
        "error_kind": o.error_kind,
        "origin_msg_id": o.delivery.version,
        "origin_queue": queue,
        "delivered": o.delivery.read_ct,
        "attempts": o.delivery.attempt,
        "dead_lettered_at": datetime.now(timezone.utc).isoformat(),
        "agent_id": agent_id,
    })


async def write_batch(conn: asyncpg.Connection, q: Queries, agent_id: str, batch: Sequence[Outcome]) -> set[int]:
    """Commit one batch in one statement; return the msg_ids whose lease was lost."""
    finish = [{"id": o.delivery.msg_id, "rc": o.delivery.read_ct,
               "h": json.loads(dlq_headers(o, q.queue, agent_id)) if o.finish == "dead_letter" else None}
              for o in batch if o.finish in ("archive", "dead_letter")]
    later = [{"id": o.delivery.msg_id, "rc": o.delivery.read_ct, "delay": o.retry_delay, "park": o.finish == "park"}
             for o in batch if o.finish in ("retry", "park")]
    states = merge_states([s for o in batch for s in ([o.state] if o.state else []) + o.extra_states])
    events = [e for o in batch for e in o.events]
    synced = [{"msg_id": o.delivery.msg_id, **o.sync} for o in batch if o.sync is not None and o.finish == "archive"]
    row = await conn.fetchrow(q.report, json.dumps(finish), q.dlq, json.dumps(later), _json_rows(states),
                              _json_rows(events), agent_id, json.dumps(synced))
    return {o.delivery.msg_id for o in batch if o.finish in ("archive", "dead_letter")} - set(row["archived"])


def _json_rows(rows: Sequence[Any]) -> str:
    """Dataclass rows as one JSON array for jsonb_to_recordset (times as unix seconds)."""
    return json.dumps([vars(r) for r in rows])


class Reporter:
    """Collects outcomes and commits them in batches on its own connection."""

    def __init__(self, pool: asyncpg.Pool, queries: Queries, agent_id: str,
                 on_committed: Callable[[list[Outcome], set[int]], None],
                 max_batch: int = 1000) -> None:
        self._pool = pool
        self._q = queries
        self._agent_id = agent_id
        self._on_committed = on_committed
        self._max_batch = max_batch
        self._pending: list[Outcome] = []
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self.flushes = 0

    def submit(self, outcome: Outcome) -> None:
        self._pending.append(outcome)
        self._idle.clear()
        self._wake.set()

    async def drained(self) -> None:
        """Return once every submitted outcome was committed (or given up)."""
        await self._idle.wait()

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                batch, self._pending = self._pending[: self._max_batch], self._pending[self._max_batch:]
                await self._commit(batch)
            self._idle.set()

    async def _commit(self, batch: list[Outcome]) -> None:
        self.flushes += 1
        delay = 0.2
        for attempt in range(1, 6):
            try:
                async with self._pool.acquire() as conn:
                    lost = await write_batch(conn, self._q, self._agent_id, batch)
                break
            except (TimeoutError, asyncpg.PostgresError, OSError) as exc:
                log.warning("report failed, will retry", extra={
                    "action": "report_failed", "error": str(exc), "attempt": attempt, "batch": len(batch)})
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        else:
            log.error("reports given up: their messages will be redelivered after the visibility timeout",
                      extra={"action": "report_given_up", "batch": len(batch)})
            self._on_committed([], {o.delivery.msg_id for o in batch})
            return
        if lost:
            log.warning("lease lost: another reader took these messages",
                        extra={"action": "lease_lost", "msg_ids": sorted(lost)})
        self._on_committed(batch, lost)
