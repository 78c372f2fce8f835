"""Leader election: one reconciler per site, across every agent of the site.

The leader holds a session-level advisory lock on the agent's session connection (agent/db/session.py),
and everything the leader does (start a scheduled run, feed runs to the queue, prune) is a statement
on that same connection, bound to the connection's generation. So a leader that has lost its
connection cannot act as leader any more, whatever it believes: Postgres frees the lock only once
that connection is gone, and a statement meant for the lost connection is never run on the next.

Standbys ask with `pg_try_advisory_lock` every AGENT_LEADER_CHECK_INTERVAL seconds (that statement
is also their connection's liveness check), and at once when a leader steps down cleanly (it
notifies `agent_leader` with the site). How soon another agent leads after the leader is gone:
- leader stopped (SIGTERM) or stepping down: at once;
- leader killed, or its connection closed: at the standbys' next try, within AGENT_LEADER_CHECK_INTERVAL
  (the lock goes with the backend at once);
- leader's host or network gone: when Postgres notices the dead client (TCP keepalive on the
  session connection: idle 10 s + 3 probes 5 s apart, about 25 s), then at the next try.
A single waiting connection per standby (not a blocking lock wait) is what lets LISTEN share it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable, Coroutine
from typing import Any

import asyncpg

from agent.db.session import DB_ERRORS, Session, SessionLost

log = logging.getLogger("agent.leader")

# Advisory lock class of leadership; the object id is the site's key (agent.site_key): one per site,
# never shared, unlike the 32-bit hashtext(site) of releases before schema 10 (class 0x61676E75).
LEADER_LOCK_CLASS = 0x61676E6C
CHANNEL = "agent_leader"        # payload: the site whose leader stepped down
TRY_LOCK = "SELECT pg_try_advisory_lock($1, agent.site_key($2))"
UNLOCK = """SELECT pg_advisory_unlock($1, k.key), pg_notify('agent_leader', $2)
            FROM agent.site_keys k WHERE k.site = $2"""

LEADER_QUERY = """
SELECT a.application_name, a.client_addr::text AS client_addr, a.backend_start
FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
  AND l.classid::bigint = $1::bigint AND l.objid::bigint = (SELECT k.key FROM agent.site_keys k WHERE k.site = $2)
"""


class LeaderConnection:
    """The leader's handle on the session connection, valid for one term: its statements run on
    the connection that holds the lock, or fail with SessionLost."""

    def __init__(self, session: Session, generation: int) -> None:
        self._session = session
        self.generation = generation
        self._unlisten: list[Callable[[], Coroutine[Any, Any, None]]] = []

    async def fetch(self, query: str, *args: Any, timeout: float = 30) -> list[asyncpg.Record]:
        return await self._session.fetch(query, *args, generation=self.generation, timeout=timeout)

    async def fetchval(self, query: str, *args: Any, timeout: float = 30) -> Any:
        return await self._session.fetchval(query, *args, generation=self.generation, timeout=timeout)

    async def execute(self, query: str, *args: Any, timeout: float = 30) -> str:
        return await self._session.execute(query, *args, generation=self.generation, timeout=timeout)

    async def listen(self, channel: str, callback: Callable[[str], None]) -> None:
        """LISTEN for this term only."""
        self._unlisten.append(await self._session.listen(channel, callback, self.generation))

    async def close(self) -> None:
        for unlisten in self._unlisten:
            with contextlib.suppress(*DB_ERRORS):
                await unlisten()
        self._unlisten.clear()


class Leadership:
    def __init__(self, session: Session, site: str, check_interval: float = 30.0) -> None:
        self._session = session
        self.site = site
        self._check_interval = check_interval
        self._asked = asyncio.Event()
        self.leading = False
        self.elections = 0
        session.subscribe(CHANNEL, self.stepped_down)  # a leader stepping down: ask at once

    def stepped_down(self, site: str) -> None:
        """An `agent_leader` notification: the leader of `site` let go; ask at once if it is ours."""
        if site == self.site and not self.leading:
            self._asked.set()

    async def run(self, lead: Callable[[LeaderConnection], Coroutine[Any, Any, None]]) -> None:
        delay, deferring = 1.0, False
        while True:
            generation = await self._session.connection()
            if deferring:  # a term just lost with its connection: the standbys ask first
                deferring = False
                await self._wait(generation, self._check_interval)
            try:
                got = await self._session.fetchval(TRY_LOCK, LEADER_LOCK_CLASS, self.site, generation=generation,
                                                   timeout=10)
            except (SessionLost, *DB_ERRORS):
                got = False  # the session reconnects and says so; ask again on the next connection
            if not got:
                await self._wait(generation, self._check_interval)
                continue
            failed = await self._lead(LeaderConnection(self._session, generation), lead)
            if failed:  # a statement failed on a live connection: let go, so another agent may lead
                await self._step_down(generation)
                await self._wait(generation, delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, 30.0)
            else:
                delay, deferring = 1.0, True

    async def _wait(self, generation: int, seconds: float) -> None:
        """Until the next try: the interval, a step-down notification, or a new connection."""
        self._asked.clear()
        waits = [asyncio.create_task(self._asked.wait()), asyncio.create_task(self._session.lost(generation))]
        try:
            await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()

    async def _lead(self, conn: LeaderConnection,
                    lead: Callable[[LeaderConnection], Coroutine[Any, Any, None]]) -> bool:
        """One term; True when it ended on an error while the connection lived on."""
        self.leading = True
        self.elections += 1
        log.info("leading reconciliation of site %s", self.site, extra={"action": "leader_elected"})
        work = asyncio.create_task(lead(conn))
        lost = asyncio.create_task(self._session.lost(conn.generation))
        try:
            await asyncio.wait([work, lost], return_when=asyncio.FIRST_COMPLETED)
            exc = None if lost.done() else work.exception()
            if lost.done() or isinstance(exc, SessionLost):
                log.error("stopped leading reconciliation of site %s: the session connection was lost",
                          self.site, extra={"action": "leader_lost"})
                return False
            if exc is not None and not isinstance(exc, (SessionLost, *DB_ERRORS)):
                raise exc  # a bug propagates
            log.error("stopped leading reconciliation of site %s: %s", self.site, exc or "the work ended",
                      extra={"action": "leader_lost"})
            return True
        finally:
            self.leading = False
            for task in (work, lost):
                task.cancel()
            await asyncio.gather(work, lost, return_exceptions=True)
            await conn.close()

    async def _step_down(self, generation: int) -> None:
        try:
            await self._session.fetch(UNLOCK, LEADER_LOCK_CLASS, self.site, generation=generation, timeout=5)
        except SessionLost:
            return  # the lock went with the connection
        except DB_ERRORS:
            self._session.restart()  # cannot tell whether the lock is still held: drop it with the connection

    async def stop(self, run: asyncio.Task[None]) -> None:
        """At shutdown: end the term and let go at once, so a standby takes over without waiting."""
        was_leading = self.leading
        generation = self._session.generation
        run.cancel()
        await asyncio.gather(run, return_exceptions=True)
        if was_leading:
            with contextlib.suppress(asyncio.CancelledError):
                await self._step_down(generation)


async def current_leader(conn: asyncpg.Connection, site: str) -> asyncpg.Record | None:
    """Which backend leads the site now (from pg_locks), or None."""
    return await conn.fetchrow(LEADER_QUERY, LEADER_LOCK_CLASS, site)
