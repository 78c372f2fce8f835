"""The RADIUS policy store: FreeRADIUS's standard rlm_sql schema in PostgreSQL (asyncpg, here) or in
MySQL/MariaDB (aiomysql, radius_mysql), chosen by the DSN's scheme (`open_store`).

The driver writes one table, `radusergroup` (a row of the suspended group that sorts first), and closes a
`radacct` row only when the NAS said the session does not exist (Error-Cause 503). Every statement, in
both dialects, is in radius_sql, with bound parameters. Errors are mapped once per client library, the same
way: a DSN the server refuses, a database or table that is not there, a missing privilege -> ConfigError
naming `policy_credential`; no connection -> UnreachableError; no answer in time -> NoAnswerError;
anything else -> TransientError.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Sequence
from typing import Protocol

import asyncpg

from agent.drivers import radius_proto as p
from agent.drivers import radius_sql as sql
from agent.errors import AgentError, ConfigError, NoAnswerError, TransientError, UnreachableError
from agent.text import clean

CONFIG_STATES = {"28000", "28P01", "3D000", "42501", "42P01", "42703", "42883"}  # auth, catalog, privilege, schema


POSTGRES_SCHEMES = ("postgresql", "postgres")
MYSQL_SCHEMES = ("mysql", "mariadb")


class Store(Protocol):
    """What the driver asks of a policy store, whichever the database; every call takes its timeout."""

    dsn: str

    async def read(self, users: Sequence[str], nas_ip: str, accounting: bool,
                   timeout: float) -> dict[str, p.Policy]: ...
    async def suspend(self, user: str, group: str, priority: int, timeout: float) -> None: ...
    async def suspend_many(self, users: Sequence[tuple[str, int]], group: str, timeout: float) -> None: ...
    async def restore(self, user: str, group: str, timeout: float) -> None: ...
    async def restore_many(self, users: Sequence[str], group: str, timeout: float) -> None: ...
    async def close_stale(self, radacct_id: int, timeout: float) -> None: ...
    async def still_open(self, radacct_ids: Sequence[int], timeout: float) -> set[int]: ...
    async def group_defined(self, group: str, timeout: float) -> bool: ...
    async def close(self) -> None: ...


def open_store(dsn: str, credential: str) -> Store:
    """The store the DSN's scheme names (nothing is connected yet); ConfigError for another scheme."""
    scheme = dsn.partition("://")[0].strip().lower() if "://" in dsn else ""
    if scheme in POSTGRES_SCHEMES:
        return PolicyStore(dsn, credential)
    if scheme in MYSQL_SCHEMES:
        from agent.drivers.radius_mysql import MySqlStore  # aiomysql only for those who use it
        return MySqlStore(dsn, credential)
    raise ConfigError(f"radius policy store (credential {credential!r}): the DSN must be postgresql://... or "
                      f"mysql://... (mariadb://...), user:password@host:port/database")


class PolicyStore:
    """PostgreSQL: one connection pool per DSN; every call takes the timeout it may use."""

    def __init__(self, dsn: str, credential: str) -> None:
        self.dsn, self.credential = dsn, credential
        self._pool: asyncpg.Pool | None = None
        self._lock = asyncio.Lock()

    async def read(self, users: Sequence[str], nas_ip: str, accounting: bool, timeout: float) -> dict[str, p.Policy]:
        async with self._connection(timeout) as conn:
            rows = await conn.fetch(sql.PG_READ, list(users), nas_ip, accounting, p.MAX_SESSIONS, timeout=timeout)
        return {r["name"]: _policy(r) for r in rows}

    async def suspend(self, user: str, group: str, priority: int, timeout: float) -> None:
        async with self._connection(timeout) as conn, conn.transaction():
            await conn.execute(sql.PG_SUSPEND, user, group, priority, timeout=timeout)

    async def suspend_many(self, users: Sequence[tuple[str, int]], group: str, timeout: float) -> None:
        """(user, priority) pairs, all in one statement."""
        async with self._connection(timeout) as conn, conn.transaction():
            await conn.execute(sql.PG_SUSPEND_MANY, [u for u, _ in users], group, [n for _, n in users],
                               timeout=timeout)

    async def restore_many(self, users: Sequence[str], group: str, timeout: float) -> None:
        async with self._connection(timeout) as conn:
            await conn.execute(sql.PG_RESTORE_MANY, list(users), group, timeout=timeout)

    async def restore(self, user: str, group: str, timeout: float) -> None:
        async with self._connection(timeout) as conn:
            await conn.execute(sql.PG_RESTORE, user, group, timeout=timeout)

    async def close_stale(self, radacct_id: int, timeout: float) -> None:
        async with self._connection(timeout) as conn:
            await conn.execute(sql.PG_CLOSE_STALE, radacct_id, timeout=timeout)

    async def still_open(self, radacct_ids: Sequence[int], timeout: float) -> set[int]:
        async with self._connection(timeout) as conn:
            return {r[0] for r in await conn.fetch(sql.PG_STILL_OPEN, list(radacct_ids), timeout=timeout)}

    async def group_defined(self, group: str, timeout: float) -> bool:
        async with self._connection(timeout) as conn:
            return bool(await conn.fetchval(sql.PG_GROUP_DEFINED, group, timeout=timeout))

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
