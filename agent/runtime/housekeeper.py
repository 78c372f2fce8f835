"""The housekeeper: readiness, systemd STATUS and watchdog, the heartbeat row, the status snapshot.

It reads each part's own small figures (`Sources`: the consumer's, the session connection's, the VPN
guard's, the device budgets', the reconciler's, leadership, parked work) and nothing else of them; the
metrics read the housekeeper's `live()` in turn, never the other way round.

The watchdog is fed unless the agent is stalled (agent.runtime.watchdog): an outage or a long backlog
changes STATUS and readiness but never gets the agent killed; work that nothing moves does. The
pings have a loop of their own that waits on nothing else, so a slow database cannot delay them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import asyncpg

from agent import __version__
from agent.db.connect import DB_ERRORS
from agent.db.queries import Queries
from agent.db.session import SessionFigures
from agent.executor.budgets import BudgetFigures
from agent.model.outcome import Outcome
from agent.queue.consumer import ConsumerFigures
from agent.reconcile.reconciler import ReconcilerFigures
from agent.runtime.metrics import Live
from agent.runtime.snapshot import Figures, healthy, snapshot, state, status_line
from agent.runtime.systemd import Notifier
from agent.runtime.watchdog import stalled
from agent.settings import LiveSettings
from agent.text import rfc3339
from agent.vpn.guard import VpnFigures


@dataclass(frozen=True)
class Identity:
    """Who this agent is, as the status and the heartbeat row say."""

    agent_id: str
    site: str
    queue: str
    instance: str  # this process, under agent_id (agent/db/identity.py)
    host_id: str


@dataclass(frozen=True)
class Sources:
    """Where the housekeeper reads the parts: each gives its own figures, taken at each use."""

    consumer: Callable[[], ConsumerFigures]
    session: Callable[[], SessionFigures]
    vpn: Callable[[], VpnFigures]
    budgets: Callable[[], BudgetFigures]
    reconciler: Callable[[], ReconcilerFigures]
    leading: Callable[[], bool]   # leads its site's reconciliation
    parked: Callable[[], int]     # messages parked for an unreachable device


log = logging.getLogger("agent.runtime.housekeeper")
_SAMPLE_TTL = 10.0
_QUEUE_CAP = 100_000


class Housekeeper:
    def __init__(self, me: Identity, parts: Sources, notifier: Notifier, pool: asyncpg.Pool, queries: Queries,
                 live: Callable[[], LiveSettings]) -> None:
        self._me = me
        self._parts = parts
        self._notifier = notifier
        self._pool = pool
        self._q = queries
        self._live = live  # the heartbeat interval and the watchdog's stall are live settings
        self._started_mono = time.monotonic()
        self._started_at = time.time()
        self.last_beat: float | None = None  # unix time of the last heartbeat row written
        self._started = False
        self._stopping = False
        self._counts = {"done": 0, "retried": 0, "dead_lettered": 0}
        self._failures: deque[dict[str, Any]] = deque(maxlen=20)
        self._queue: dict[str, Any] = {}
        self._sampled = 0.0
        self._db_error: str | None = None

    # -- events from the daemon ----------------------------------------------------------

    def started(self) -> None:
        self._started = True
        self._notifier.ready(self.status_line())

    def stopping(self) -> None:
        self._stopping = True
        self._notifier.stopping(self.status_line())

    def committed(self, outcomes: list[Outcome]) -> None:
        for o in outcomes:
            key = {"archive": "done", "retry": "retried", "dead_letter": "dead_lettered"}.get(o.finish)
            if key is None:
                continue
            self._counts[key] += 1
            if o.finish != "archive":
                # the cause ("failed", "parked"), not the bookkeeping after it ("retried: retry in 0.7s")
                ev = next((e for e in reversed(o.events) if e.kind in ("failed", "parked", "dead_lettered")),
                          o.events[-1] if o.events else None)
                if ev is not None and ev.kind == "dead_lettered":
                    ev = next((e for e in reversed(o.events) if e.kind == "failed"), ev)
                self._failures.append({"at": rfc3339(time.time()), "msg_id": o.delivery.msg_id, "finish": o.finish,
                                       "device": ev.device if ev else None, "service": ev.service if ev else None,
                                       "error": o.reason or (ev.error if ev else None)})

    # -- what we tell -------------------------------------------------------------------

    def figures(self) -> Figures:
        me, p = self._me, self._parts
        consumer, session, vpn, leading = p.consumer(), p.session(), p.vpn(), p.leading()
        next_run = p.reconciler().next_run
        return Figures(
            agent_id=me.agent_id, site=me.site, queue=me.queue, version=__version__,
            started=self._started, stopping=self._stopping, uptime_s=round(time.monotonic() - self._started_mono, 1),
            database_error=self._database_error(consumer), listener_up=session.connected,
            session_error=session.error,
            inflight=consumer.inflight, parked=p.parked(), done=self._counts["done"],
            retried=self._counts["retried"],
            dead_lettered=self._counts["dead_lettered"], queue_depth=self._queue.get("depth"),
            queue_oldest_s=self._queue.get("oldest"), dlq_depth=self._queue.get("dlq_depth"),
            recent_failures=list(self._failures), **_vpn_figures(vpn),
            leader=leading, budgets=list(p.budgets().devices),
            next_reconcile=rfc3339(next_run) if leading and next_run else None)

    def _database_error(self, consumer: ConsumerFigures) -> str | None:
        """Why the last read or the last pooled statement of the housekeeper failed, if it did."""
        return consumer.read_error or self._db_error

    def status_line(self) -> str:
        return status_line(self.figures())

    def ready(self) -> bool:
        return healthy(self.figures())

    def live(self) -> Live:
        p, q = self._parts, self._queue
        consumer, session, vpn, budgets, reconciler = p.consumer(), p.session(), p.vpn(), p.budgets(), p.reconciler()
        queues = {}
        if "depth" in q:
            queues = {self._me.queue: (q["depth"], q["oldest"]), self._q.dlq: (q["dlq_depth"], q["dlq_oldest"])}
        peers = {v.peer: (v.handshake_age, v.rx_bytes, v.tx_bytes, v.up) for v in vpn.peers}
        return Live(wakeups=dict(consumer.wakeups), reconnects=session.reconnects,
                    database_up=session.connected and not self._database_error(consumer),
                    inflight=consumer.inflight, parked=p.parked(), queues=queues,
                    reachable={d: r.reachable for d, r in vpn.reach.items()}, peers=peers,
                    leader=p.leading(), last_heartbeat=self.last_beat, tables=dict(reconciler.tables),
                    pruned_at=reconciler.pruned_at, held=q.get("held"),
                    breakers=dict(budgets.breakers), rate_waits=dict(budgets.rate_waits), ready=self.ready())

    async def sample_queue(self, max_age: float = _SAMPLE_TTL) -> None:
        """Refresh the queue figures unless a sample younger than `max_age` exists (one statement)."""
        if time.monotonic() - self._sampled < max_age:
            return
        try:
            async with self._pool.acquire() as conn:
                row = await conn.fetchrow(self._q.queue_stats, _QUEUE_CAP)
        except DB_ERRORS as exc:  # not tried again before max_age: scrapes during an outage stay quick
            self._db_error = str(exc) or type(exc).__name__
            self._sampled = time.monotonic()
            return
        self._db_error = None
        self._sampled = time.monotonic()
        self._queue = {k: (float(v) if k.endswith("oldest") and v is not None else v) for k, v in dict(row).items()}

    async def snapshot(self) -> dict[str, Any]:
        await self.sample_queue()
        f = self.figures()
        with contextlib.suppress(*DB_ERRORS):
            async with self._pool.acquire() as conn:
                f.drifted = [dict(r) for r in await conn.fetch(self._q.drifted, 20, self._me.site)]
        return snapshot(f)

    # -- the loop ------------------------------------------------------------------------

    async def run(self) -> None:
        beaten: float | None = None
        while True:
            now, every = time.monotonic(), self._live().heartbeat_interval  # live: a reload counts at once
            if beaten is None or now >= beaten + every:
                beaten = now
                await self.sample_queue(max_age=every * 2)
                await self.beat(None)
            self._notifier.status(self.status_line())
            await asyncio.sleep(1.0)

    async def watch(self) -> None:
        """WATCHDOG=1 at half of WATCHDOG_USEC (the notifier's interval) unless the agent is stalled."""
        every = self._notifier.watchdog_interval or 1.0
        while True:
            consumer = self._parts.consumer()
            stall = self._live().watchdog_stall
            if not stalled(time.monotonic(), consumer.last_progress, consumer.work_waits, stall):
                self._notifier.watchdog()
            else:
                log.error("stalled: work waits and nothing progressed for %.0f s: watchdog not fed", stall,
                          extra={"action": "stalled", "inflight": consumer.inflight})
            await asyncio.sleep(every)

    async def beat(self, override: str | None) -> None:
        me, f, consumer = self._me, self.figures(), self._parts.consumer()
        st = override or state(f)
        figures = {"inflight": f.inflight, "done": f.done, "retried": f.retried, "dead_lettered": f.dead_lettered,
                   "queue_depth": f.queue_depth, "listener_up": f.listener_up}
        try:
            async with self._pool.acquire() as conn:
                done = await conn.execute(self._q.heartbeat, me.agent_id, me.site, me.queue,
                                          socket.gethostname(), os.getpid(), __version__,
                                          _ts(self._started_at), st, status_line(f),
                                          _ts(consumer.last_cycle_wall), consumer.last_cycle_ms,
                                          json.dumps(figures), me.instance, me.host_id)
        except DB_ERRORS as exc:
            self._db_error = str(exc) or type(exc).__name__
            log.warning("heartbeat failed: %s", exc, extra={"action": "heartbeat_failed"})
        else:
            self._db_error = None
            self.last_beat = time.time()
            if done == "INSERT 0 0":  # another process registered under this agent id meanwhile
                log.error("another process has registered as agent %s (this one's heartbeat was stale): its row "
                          "in agent.agents is left to it; stop this one", me.agent_id,
                          extra={"action": "agent_id_taken"})


def _vpn_figures(vpn: VpnFigures) -> dict[str, Any]:
    """The guard's figures as /status shows them."""
    peers = [{"peer": v.peer, "state": "up" if v.up else "down", "reason": v.reason,
              "handshake_age_s": None if v.handshake_age is None else round(v.handshake_age, 1),
              "endpoint": v.endpoint, "rx_bytes": v.rx_bytes, "tx_bytes": v.tx_bytes}
             for v in vpn.peers]
    unreachable = [{"device": d, "reason": r.reason, "since": r.since}
                   for d, r in sorted(vpn.reach.items()) if not r.reachable]
    return {"vpn_required": vpn.required, "vpn_error": vpn.error, "peers": peers, "unreachable": unreachable}


def _ts(epoch: float | None):  # type: ignore[no-untyped-def]
    from datetime import datetime, timezone

    return datetime.fromtimestamp(epoch, timezone.utc) if epoch else None
