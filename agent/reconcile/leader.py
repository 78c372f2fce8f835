"""Leader election: one reconciler per site, across every agent of the site.

The leader holds a session-level advisory lock on a dedicated connection, and everything the leader
does (start a scheduled run, feed runs to the queue) is a statement on that same connection. So a
leader that has lost its connection cannot act as leader any more, whatever it believes: Postgres
frees the lock only once that connection is gone. Standbys wait for the lock in Postgres itself
(`pg_advisory_lock` with a lock_timeout, so their connection is exercised too): they take over the
moment it is freed.

How soon another agent leads after the leader is gone:
- leader killed, or its connection closed: at once (the lock goes with the backend);
- leader's host or network gone: when Postgres notices the dead client: TCP keepalive on this
  connection is idle 10 s + 3 probes 5 s apart, so about 25 s (no keepalive on a Unix socket:
  there, the kernel tells Postgres when the process dies).
The leader itself notices a closed connection at once, a silent one within AGENT_LEADER_CHECK_INTERVAL
(30 s) + a 5 s timeout, and stops; by then it could not act anyway (see above).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Coroutine
from typing import Any

import asyncpg

log = logging.getLogger("agent.leader")

LEADER_LOCK_CLASS = 0x61676E75  # advisory lock class of leadership (object id: hashtext(site))
DB_ERRORS = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError)
KEEPALIVE = {"tcp_keepalives_idle": "10", "tcp_keepalives_interval": "5", "tcp_keepalives_count": "3"}
WAIT = "30s"  # a standby's lock wait, after which it asks again (and its connection is known alive)

LEADER_QUERY = """
SELECT a.application_name, a.client_addr::text AS client_addr, a.backend_start
FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
  AND l.classid::bigint = $1::bigint AND l.objid::bigint = (hashtext($2)::bigint & 4294967295)
"""


class LeaderConnection:
    """The leader's connection: statements one at a time (asyncpg allows no overlap)."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.raw = conn
        self._lock = asyncio.Lock()

    async def fetch(self, query: str, *args: Any, timeout: float = 30) -> list[asyncpg.Record]:
        async with self._lock:
            return await self.raw.fetch(query, *args, timeout=timeout)

    async def fetchval(self, query: str, *args: Any, timeout: float = 30) -> Any:
        async with self._lock:
            return await self.raw.fetchval(query, *args, timeout=timeout)

    async def execute(self, query: str, *args: Any, timeout: float = 30) -> str:
        async with self._lock:
            return await self.raw.execute(query, *args, timeout=timeout)


class Leadership:
    def __init__(self, dsn: str, site: str, agent_id: str, check_interval: float = 30.0) -> None:
        self._dsn = dsn
        self.site = site
        self._agent_id = agent_id
        self._check_interval = check_interval
        self.leading = False

    async def run(self, lead: Callable[[LeaderConnection], Coroutine[Any, Any, None]]) -> None:
        delay = 1.0
        while True:
            conn = None
            try:
                conn = await asyncpg.connect(self._dsn, timeout=10, server_settings={
                    "application_name": f"agentd leader {self._agent_id}"[:63], "lock_timeout": WAIT, **KEEPALIVE})
                await self._wait_for_lock(conn)
                elected = time.monotonic()
                try:
                    await self._lead(LeaderConnection(conn), lead)
                finally:
                    if time.monotonic() - elected > 60:  # a long term ended: try again soon
                        delay = 1.0
            except DB_ERRORS as exc:
                if self.leading:
                    log.error("stopped leading reconciliation of site %s: %s", self.site, exc,
                              extra={"action": "leader_lost"})
                else:
                    log.warning("leader election: %s; retrying in %.0fs", exc, delay,
                                extra={"action": "election_failed"})
            finally:
                self.leading = False
                if conn is not None:
                    conn.terminate()
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, 30.0)

    async def _wait_for_lock(self, conn: asyncpg.Connection) -> None:
        while True:
            try:
                await conn.execute("SELECT pg_advisory_lock($1, hashtext($2))", LEADER_LOCK_CLASS, self.site)
                return
            except asyncpg.LockNotAvailableError:
                continue  # still led by another agent; the connection has just proved alive

    async def _lead(self, conn: LeaderConnection,
                    lead: Callable[[LeaderConnection], Coroutine[Any, Any, None]]) -> None:
        self.leading = True
        log.info("leading reconciliation of site %s", self.site, extra={"action": "leader_elected"})
        lost = asyncio.Event()
        conn.raw.add_termination_listener(lambda _c: lost.set())
        work = asyncio.create_task(lead(conn))
        watch = asyncio.create_task(self._watch(conn, lost))
        try:
            done, _ = await asyncio.wait([work, watch], return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # a DB error ends this term (logged by run); a bug propagates
            raise ConnectionError("leader connection closed")
        finally:
            for task in (work, watch):
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError, *DB_ERRORS):
                await asyncio.gather(work, watch, return_exceptions=True)

    async def _watch(self, conn: LeaderConnection, lost: asyncio.Event) -> None:
        while not lost.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(lost.wait(), self._check_interval)
            if lost.is_set():
                return
            await conn.fetchval("SELECT 1", timeout=5)


async def current_leader(conn: asyncpg.Connection, site: str) -> asyncpg.Record | None:
    """Which backend leads the site now (from pg_locks), or None."""
    return await conn.fetchrow(LEADER_QUERY, LEADER_LOCK_CLASS, site)
