"""Retention: how long each growing table keeps its rows, and pruning in small batches.

The site's leader prunes every AGENT_PRUNE_INTERVAL seconds on its own connection (not the pool
the commands use), AGENT_PRUNE_BATCH rows per statement with a pause between statements, and at
most MAX_BATCHES per table and pass, so a backlog is worked off over several passes instead of in
one long transaction. `agentctl db prune` runs the same statements until nothing is left.

The decisions (cutoffs, whether to go on) are pure; the SQL is in agent/db/queries.sql.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol

from agent.db.queries import Queries

if TYPE_CHECKING:
    from agent.settings import Settings

log = logging.getLogger("agent.db.retention")

# Pruned tables, in the order of a pass. The live queue is never pruned: only what is settled.
# `agents`: rows of agents that stopped or went silent (agent.agents), by their last heartbeat.
# Batches (agent.batch_commands) go with the events, at the events' retention.
TABLES = ("archive", "dlq_archive", "dlq", "events", "batches", "requests", "sync_runs", "agents")
MAX_BATCHES = 50
PAUSE = 0.05  # seconds between statements: other work on the database goes first


class Conn(Protocol):
    async def fetchval(self, query: str, *args: Any) -> Any: ...
    async def execute(self, query: str, *args: Any) -> str: ...


@dataclass(frozen=True)
class Retention:
    """Days each kind of row is kept (0: forever)."""

    archive_days: int = 14
    dlq_days: int = 90
    events_days: int = 180
    requests_days: int = 30
    sync_runs_days: int = 7
    batch: int = 1000
    interval: float = 600.0
    agents_days: int = 7

    @classmethod
    def from_settings(cls, s: Settings) -> Retention:
        return cls(archive_days=s.retain_archive_days, dlq_days=s.retain_dlq_days, events_days=s.retain_events_days,
                   requests_days=s.retain_requests_days, sync_runs_days=s.reconcile_retention_days,
                   batch=s.prune_batch, interval=s.prune_interval, agents_days=s.retain_agents_days)

    def days(self, table: str) -> int:
        return {"archive": self.archive_days, "dlq_archive": self.archive_days, "dlq": self.dlq_days,
                "events": self.events_days, "batches": self.events_days, "requests": self.requests_days,
                "sync_runs": self.sync_runs_days, "agents": self.agents_days}[table]


def cutoffs(r: Retention, now: datetime) -> dict[str, datetime]:
    """table -> rows older than this go; tables kept forever are absent."""
    return {t: now - timedelta(days=r.days(t)) for t in TABLES if r.days(t) > 0}


def go_on(deleted: int, batch: int, done: int, max_batches: int | None) -> bool:
    """Another batch? Only while the last one came back full, and within the pass's budget."""
    return deleted >= batch and (max_batches is None or done < max_batches)


def _deleted(status: Any) -> int:
    """Rows removed by a statement: DELETE's status tag ('DELETE 17') or prune_audit's count."""
    if isinstance(status, str):
        return int(status.rsplit(" ", 1)[-1])
    return int(status or 0)


async def _batch(conn: Conn, q: Queries, table: str, cutoff: datetime, batch: int, site: str | None) -> int:
    sql = getattr(q, f"prune_{table}")
    args: tuple[Any, ...] = (cutoff, batch, site) if table == "sync_runs" else (cutoff, batch)
    if table in ("events", "batches", "requests", "agents"):
        return _deleted(await conn.fetchval(sql, *args))
    return _deleted(await conn.execute(sql, *args))


async def due(conn: Conn, q: Queries, r: Retention, site: str | None = None) -> dict[str, int]:
    """What a prune would remove now, per table (`agentctl db prune --dry-run`)."""
    now = await conn.fetchval("SELECT now()")
    out = {}
    for table, cutoff in cutoffs(r, now).items():
        args = (cutoff, site) if table == "sync_runs" else (cutoff,)
        out[table] = int(await conn.fetchval(getattr(q, f"due_{table}"), *args))
    return out


async def prune(conn: Conn, q: Queries, r: Retention, site: str | None = None, *,
                max_batches: int | None = MAX_BATCHES, pause: float = PAUSE) -> dict[str, int]:
    """One pass: per table, batches of old rows until none is left or the budget is spent.
    Returns rows removed per table. `site` limits sync runs to one site (the leader's)."""
    now = await conn.fetchval("SELECT now()")
    removed = {}
    for table, cutoff in cutoffs(r, now).items():
        total = done = 0
        while True:
            n = await _batch(conn, q, table, cutoff, r.batch, site)
            total, done = total + n, done + 1
            if not go_on(n, r.batch, done, max_batches):
                break
            await asyncio.sleep(pause)
        removed[table] = total
    if any(removed.values()):
        log.info("pruned %s", ", ".join(f"{n} {t}" for t, n in removed.items() if n),
                 extra={"action": "pruned"})
    return removed


async def table_stats(conn: Any, q: Queries) -> dict[str, tuple[int, float | None]]:
    """table -> (bytes on disk, age of its oldest row in seconds or None when empty)."""
    rows = await conn.fetch(q.table_stats)
    return {r["name"]: (int(r["bytes"]), float(r["oldest_age"]) if r["oldest_age"] is not None else None)
            for r in rows}
