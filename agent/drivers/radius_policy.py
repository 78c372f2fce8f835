"""The RADIUS policy store: FreeRADIUS's standard rlm_sql schema in PostgreSQL, through asyncpg.

The driver writes one table, `radusergroup` (a row of the suspended group that sorts first), and closes a
`radacct` row only when the NAS said the session does not exist (Error-Cause 503). Every statement is a
named constant with bound parameters. Errors are mapped once here: a DSN the server refuses, a database or
table that is not there, a missing privilege -> ConfigError naming `policy_credential`; no connection ->
UnreachableError; no answer in time -> NoAnswerError; anything else -> TransientError.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Sequence

import asyncpg

from agent.drivers import radius_proto as p
from agent.errors import AgentError, ConfigError, NoAnswerError, TransientError, UnreachableError
from agent.text import clean

# Per user: is it known at all, its groups, and (with accounting) its open sessions on this NAS.
READ = """
SELECT u.name,
       EXISTS (SELECT 1 FROM radcheck WHERE username = u.name)
         OR EXISTS (SELECT 1 FROM radreply WHERE username = u.name)
         OR EXISTS (SELECT 1 FROM radusergroup WHERE username = u.name) AS known,
       (SELECT coalesce(json_agg(json_build_array(groupname, priority)), '[]')
          FROM radusergroup WHERE username = u.name) AS groups,
       (SELECT coalesce(json_agg(json_build_array(s.radacctid, s.acctsessionid, host(s.framedipaddress))), '[]')
          FROM (SELECT radacctid, acctsessionid, framedipaddress FROM radacct
                 WHERE $3 AND username = u.name AND nasipaddress = $2::inet AND acctstoptime IS NULL
                 ORDER BY acctstarttime DESC NULLS LAST LIMIT $4) s) AS sessions
  FROM unnest($1::text[]) AS u(name)
"""
# The suspended group's row, placed before every other group of the user; one row, whatever was there.
SUSPEND = """
WITH gone AS (DELETE FROM radusergroup WHERE username = $1 AND groupname = $2)
INSERT INTO radusergroup (username, groupname, priority) VALUES ($1, $2, $3)
"""
RESTORE = "DELETE FROM radusergroup WHERE username = $1 AND groupname = $2"
# A month-end take: every user's suspended row in one statement ($1 users, $3 their priorities).
SUSPEND_MANY = """
WITH w AS (SELECT * FROM unnest($1::text[], $3::integer[]) AS w(username, priority)),
gone AS (DELETE FROM radusergroup g USING w WHERE g.username = w.username AND g.groupname = $2)
INSERT INTO radusergroup (username, groupname, priority) SELECT w.username, $2, w.priority FROM w
"""
RESTORE_MANY = "DELETE FROM radusergroup WHERE username = ANY($1::text[]) AND groupname = $2"
# A session the NAS says it does not have (Error-Cause 503): its Accounting-Stop was lost.
CLOSE_STALE = """
UPDATE radacct SET acctstoptime = now(), acctupdatetime = now(),
       acctsessiontime = greatest(0, extract(epoch FROM now() - acctstarttime))::bigint,
       acctterminatecause = 'Session-Context-Not-Found'
 WHERE radacctid = $1 AND acctstoptime IS NULL
"""
STILL_OPEN = "SELECT radacctid FROM radacct WHERE radacctid = ANY($1::bigint[]) AND acctstoptime IS NULL"
# A suspension into a group without check or reply attributes suspends nobody.
GROUP_DEFINED = """
SELECT (SELECT count(*) FROM radgroupcheck WHERE groupname = $1)
     + (SELECT count(*) FROM radgroupreply WHERE groupname = $1)
"""

CONFIG_STATES = {"28000", "28P01", "3D000", "42501", "42P01", "42703", "42883"}  # auth, catalog, privilege, schema


class PolicyStore:
    """One connection pool per DSN; every call takes the timeout it may use."""

    def __init__(self, dsn: str, credential: str) -> None:
        self.dsn, self.credential = dsn, credential
        self._pool: asyncpg.Pool | None = None
        self._lock = asyncio.Lock()

    async def read(self, users: Sequence[str], nas_ip: str, accounting: bool, timeout: float) -> dict[str, p.Policy]:
        async with self._connection(timeout) as conn:
            rows = await conn.fetch(READ, list(users), nas_ip, accounting, p.MAX_SESSIONS, timeout=timeout)
        return {r["name"]: _policy(r) for r in rows}

    async def suspend(self, user: str, group: str, priority: int, timeout: float) -> None:
        async with self._connection(timeout) as conn, conn.transaction():
            await conn.execute(SUSPEND, user, group, priority, timeout=timeout)

    async def suspend_many(self, users: Sequence[tuple[str, int]], group: str, timeout: float) -> None:
        """(user, priority) pairs, all in one statement."""
        async with self._connection(timeout) as conn, conn.transaction():
            await conn.execute(SUSPEND_MANY, [u for u, _ in users], group, [n for _, n in users], timeout=timeout)

    async def restore_many(self, users: Sequence[str], group: str, timeout: float) -> None:
        async with self._connection(timeout) as conn:
            await conn.execute(RESTORE_MANY, list(users), group, timeout=timeout)

    async def restore(self, user: str, group: str, timeout: float) -> None:
        async with self._connection(timeout) as conn:
            await conn.execute(RESTORE, user, group, timeout=timeout)

    async def close_stale(self, radacct_id: int, timeout: float) -> None:
        async with self._connection(timeout) as conn:
            await conn.execute(CLOSE_STALE, radacct_id, timeout=timeout)

    async def still_open(self, radacct_ids: Sequence[int], timeout: float) -> set[int]:
        async with self._connection(timeout) as conn:
            return {r[0] for r in await conn.fetch(STILL_OPEN, list(radacct_ids), timeout=timeout)}

    async def group_defined(self, group: str, timeout: float) -> bool:
        async with self._connection(timeout) as conn:
            return bool(await conn.fetchval(GROUP_DEFINED, group, timeout=timeout))

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            with contextlib.suppress(Exception):
                await asyncio.wait_for(pool.close(), 5)

    @contextlib.asynccontextmanager
    async def _connection(self, timeout: float) -> AsyncIterator[asyncpg.Connection]:
        try:
            pool = await self._get_pool(timeout)
            async with pool.acquire(timeout=timeout) as conn:
                yield conn
        except AgentError:
            raise
        except Exception as exc:
            raise self._mapped(exc, timeout) from None

    async def _get_pool(self, timeout: float) -> asyncpg.Pool:
        async with self._lock:
            if self._pool is None:
                self._pool = await asyncpg.create_pool(self.dsn, min_size=0, max_size=4, timeout=timeout,
                                                       command_timeout=timeout, max_inactive_connection_lifetime=60)
            return self._pool

    def _mapped(self, exc: BaseException, timeout: float) -> AgentError:
        what = f"radius policy store (credential {self.credential!r})"
        state = getattr(exc, "sqlstate", None)
        if state in CONFIG_STATES:
            return ConfigError(f"{what}: {type(exc).__name__}: {clean(exc, 200)}: check the DSN in that credential, "
                               f"and that the database has FreeRADIUS's rlm_sql schema and grants")
        if isinstance(exc, TimeoutError | asyncio.TimeoutError):
            return NoAnswerError(f"{what}: no answer within {timeout:g}s")
        if isinstance(exc, OSError):
            return UnreachableError(f"{what}: cannot connect: {clean(exc.strerror or exc, 200)}")
        if isinstance(exc, ValueError):  # the DSN does not parse (its text, which may hold a password, is not shown)
            return ConfigError(f"{what}: the DSN cannot be used ({type(exc).__name__}): it must be a PostgreSQL "
                               f"DSN, postgresql://user:password@host:port/database")
        return TransientError(f"{what}: {type(exc).__name__}: {clean(exc, 200)}")


def _policy(row: asyncpg.Record) -> p.Policy:
    groups = tuple((str(g), int(pr)) for g, pr in json.loads(row["groups"]))
    sessions = tuple(p.Session(int(i), str(s), f) for i, s, f in json.loads(row["sessions"]))
    return p.Policy(row["name"], bool(row["known"]), groups, sessions)
