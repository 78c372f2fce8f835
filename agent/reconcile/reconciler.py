"""What the site's leader does: start a scheduled reconcile run when it is due, and feed the devices
of open runs (scheduled or asked for with `agentctl sync`) to the queue a few at a time.

Feeding keeps at most AGENT_RECONCILE_BATCH devices outstanding, and only one while commands are
waiting in the queue, so commands go first and a run never floods the queue. It is woken by
`agent_sync` notifications (a run asked for, a device done) and looks again every FEED_POLL seconds
while runs are open.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from agent.db.connect import DB_ERRORS
from agent.db.leadership import LeaderConnection
from agent.db.queries import Queries
from agent.db.retention import Retention, prune, table_stats
from agent.reconcile.schedule import Schedule

log = logging.getLogger("agent.reconcile")
FEED_POLL = 5.0
IDLE_POLL = 300.0


@dataclass(frozen=True)
class ReconcilerFigures:
    """What the leader's reconciler tells the housekeeper and the metrics (nothing while not leading)."""

    next_run: datetime | None                         # the next scheduled run
    tables: Mapping[str, tuple[int, float | None]]    # table -> (bytes, oldest row age), after a prune pass
    pruned_at: float | None                           # unix time of the last prune pass that completed


class Reconciler:
    def __init__(self, queries: Queries, site: str, agent_id: str, schedule: Schedule, batch: int,
                 retention: Retention | int) -> None:
        self._q = queries
        self._site = site
        self._agent_id = agent_id
        self.schedule = schedule
        self._batch = batch
        # an int: only sync runs are pruned, kept that many days (the other tables kept forever)
        self._retention = retention if isinstance(retention, Retention) else Retention(0, 0, 0, 0, retention)
        self.tables: dict[str, tuple[int, float | None]] = {}  # table -> (bytes, oldest row age), after a pass
        self.pruned_at: float | None = None  # unix time of the last pass that completed, while leading
        self.next_run: datetime | None = None

    def figures(self) -> ReconcilerFigures:
        return ReconcilerFigures(self.next_run, dict(self.tables), self.pruned_at)

    async def lead(self, conn: LeaderConnection) -> None:
        kick = asyncio.Event()
        await conn.listen("agent_sync", lambda _payload: kick.set())
        pruner = asyncio.create_task(self._pruning(conn), name="retention")  # statements serialised by conn
        try:
            await self._feed(conn, kick)
        finally:
            pruner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pruner
            self.tables, self.pruned_at = {}, None

    async def _pruning(self, conn: LeaderConnection) -> None:
        """Retention, off the hot path: on the leader's own connection, in small batches, every
        AGENT_PRUNE_INTERVAL seconds. A failed pass is logged and tried again next time."""
        while True:
            try:
                await prune(conn, self._q, self._retention, self._site)
                self.tables = await table_stats(conn, self._q)
                self.pruned_at = time.time()
            except DB_ERRORS as exc:
                log.warning("pruning failed: %s", exc, extra={"action": "prune_failed"})
            await asyncio.sleep(self._retention.interval)

    async def _feed(self, conn: LeaderConnection, kick: asyncio.Event) -> None:
        since = await conn.fetchval("SELECT clock_timestamp()")
        self.next_run = self.schedule.next_after(_now())
        if self.next_run:
            log.info("next scheduled reconcile at %s", self.next_run.isoformat(timespec="seconds"),
                     extra={"action": "reconcile_scheduled"})
        while True:
            now = _now()
            if self.next_run is not None and now >= self.next_run:
                await self._start_run(conn)
                self.next_run = self.schedule.next_after(now)
            sent = await conn.fetch(self._q.feed_sync, self._site, self._q.queue, self._batch, 1)
            if sent:
                log.debug("fed %d device(s) to the queue", len(sent), extra={"action": "reconcile_fed"})
            since = await self._summarise(conn, since)
            still_open = bool(sent) or await conn.fetchval(self._q.open_runs, self._site)
            wait = FEED_POLL if still_open else IDLE_POLL
            if self.next_run is not None:
                wait = min(wait, max(0.0, (self.next_run - _now()).total_seconds()))
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for returns normally when it is
            # cancelled just as the event is set (an `agent_sync` notification at shutdown), and the
            # cancellation is lost: the feed went on and the agent never stopped.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await kick.wait()
            kick.clear()

    async def _summarise(self, conn: LeaderConnection, since: datetime) -> datetime:
        """One line per finished run (per-device lines are DEBUG): 5,000 devices every 5 minutes
        must not write a million lines a day."""
        for row in await conn.fetch(self._q.finished_runs, self._site, since):
            level, text = run_summary(dict(row))
            log.log(level, text, extra={"action": "reconcile_finished", "run": row["id"], "site": self._site})
            since = max(since, row["finished_at"])
        return since

    async def _start_run(self, conn: LeaderConnection) -> None:
        """A scheduled run of the site's devices, but for those an open run has not checked yet: one
        slow, paused or unreachable device holds up none of the others' reconciliation."""
        row = (await conn.fetch(self._q.start_scheduled_run, self._site, self._agent_id))[0]
        left = f"; {row['outstanding']} device(s) still outstanding in earlier runs are left to them" \
            if row["outstanding"] else ""
        if row["run"] is None:
            log.warning("scheduled reconcile skipped: all %d device(s) are still outstanding in earlier runs",
                        row["outstanding"], extra={"action": "reconcile_skipped"})
            return
        log.info("scheduled reconcile run %d started: %d device(s)%s", row["run"], row["devices"], left,
                 extra={"action": "reconcile_started", "run": row["run"]})


def run_summary(r: dict[str, Any]) -> tuple[int, str]:
    """(level, line) for a finished run: INFO when all was in sync, WARNING when drift was found or
    something could not be read or repaired."""
    scope = ", ".join(f"{k} {r[k]}" for k in ("device", "service") if r.get(k)) or "whole site"
    text = (f"reconcile run {r['id']} ({r['kind']}, {scope}{', dry run' if r['dry_run'] else ''}) finished in "
            f"{float(r['took'] or 0):.1f}s: {r['devices']} device(s), {r['checked']} service(s) checked: "
            f"{r['in_sync']} in sync, {r['drifted']} drifted, {r['repaired']} repaired, "
            f"{r['unreadable']} unreadable, {r['failed']} failed")
    troubled = r["drifted"] or r["unreadable"] or r["failed"]
    return (logging.WARNING if troubled else logging.INFO), text


def _now() -> datetime:
    return datetime.now(timezone.utc)
