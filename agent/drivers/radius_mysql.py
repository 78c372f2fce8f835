"""The RADIUS policy store in MySQL or MariaDB (FreeRADIUS's rlm_sql schema, as its `mysql` dialect makes
it), through aiomysql (MIT, on PyMySQL, MIT). The statements are in radius_sql; this module connects,
runs them within the caller's timeout, and maps errors as radius_policy does for PostgreSQL: a DSN the
server refuses (1045 access denied), a database or table that is not there, a missing privilege ->
ConfigError naming `policy_credential`; no connection -> UnreachableError; no answer in time ->
NoAnswerError; anything else -> TransientError.

DSN: mysql://user:password@host[:port]/database (mariadb:// too), with `?unix_socket=/path` for a local
server's socket. A connection that failed or was cut by the timeout is closed, never put back in the pool.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import aiomysql
import pymysql

from agent.drivers import radius_proto as p
from agent.drivers import radius_sql as sql
from agent.errors import AgentError, ConfigError, NoAnswerError, TransientError, UnreachableError
from agent.text import clean

DEFAULT_PORT = 3306
# access denied (user, database, table, column, command), unknown database, table or column
CONFIG_CODES = {1044, 1045, 1049, 1054, 1142, 1143, 1146, 1227, 1698}
UNREACHABLE_CODES = {2002, 2003, 2005}  # cannot connect (socket, TCP), unknown host
QUERY_OPTIONS = {"unix_socket"}


def connect_args(dsn: str, credential: str) -> dict[str, Any]:
    """aiomysql's arguments from the DSN; ConfigError naming the credential (never showing the DSN)."""
    try:
        parts = urlsplit(dsn.strip())
        query = {k: v[-1] for k, v in parse_qs(parts.query, strict_parsing=bool(parts.query)).items()}
        port = parts.port or DEFAULT_PORT
        database = unquote(parts.path.lstrip("/"))
        if unknown := set(query) - QUERY_OPTIONS:
            raise ValueError(f"unknown option(s) {sorted(unknown)}")
        if not database or "/" in database or not parts.username:
            raise ValueError("no database or user")
    except ValueError as exc:
        text = str(exc) if str(exc).startswith(("unknown option", "no database")) else type(exc).__name__
        raise ConfigError(f"radius policy store (credential {credential!r}): the DSN cannot be used "
                          f"({clean(text, 100)}): it must be mysql://user:password@host:port/database "
                          f"(optionally ?unix_socket=/path)") from None
    return {"host": parts.hostname or "localhost", "port": port, "user": unquote(parts.username),
            "password": unquote(parts.password or ""), "db": database, "unix_socket": query.get("unix_socket"),
            "charset": "utf8mb4", "autocommit": True}


class MySqlStore:
    """One aiomysql pool per DSN; every call takes the timeout it may use."""

    def __init__(self, dsn: str, credential: str) -> None:
        self.dsn, self.credential = dsn, credential
        self._args = connect_args(dsn, credential)
        self._pool: aiomysql.Pool | None = None
        self._lock = asyncio.Lock()

    async def read(self, users: Sequence[str], nas_ip: str, accounting: bool, timeout: float) -> dict[str, p.Policy]:
        rows: list[Sequence[object]] = []
        async with self._connection(timeout) as cur:
            for part in sql.chunks(list(users)):
                names = [str(u) for u in part]
                await cur.execute(sql.mysql_read(len(names), accounting),
                                  sql.mysql_read_args(names, nas_ip, accounting))
                rows.extend(await cur.fetchall())
        return sql.mysql_policies(list(users), rows)

    async def suspend(self, user: str, group: str, priority: int, timeout: float) -> None:
        async with self._connection(timeout, transaction=True) as cur:
            await cur.execute(sql.MYSQL_DELETE, (user, group))
            await cur.execute(sql.MYSQL_INSERT, (user, group, priority))

    async def suspend_many(self, users: Sequence[tuple[str, int]], group: str, timeout: float) -> None:
        """(user, priority) pairs, all in one transaction (a statement per CHUNK users)."""
        async with self._connection(timeout, transaction=True) as cur:
            for part in sql.chunks(list(users)):
                await cur.execute(sql.mysql_delete_many(len(part)), [group, *(u for u, _ in part)])
                await cur.execute(sql.mysql_insert_many(len(part)),
                                  [v for u, n in part for v in (u, group, n)])

    async def restore(self, user: str, group: str, timeout: float) -> None:
        async with self._connection(timeout) as cur:
            await cur.execute(sql.MYSQL_DELETE, (user, group))

    async def restore_many(self, users: Sequence[str], group: str, timeout: float) -> None:
        async with self._connection(timeout, transaction=True) as cur:
            for part in sql.chunks(list(users)):
                await cur.execute(sql.mysql_delete_many(len(part)), [group, *part])

    async def close_stale(self, radacct_id: int, timeout: float) -> None:
        async with self._connection(timeout) as cur:
            await cur.execute(sql.MYSQL_CLOSE_STALE, (radacct_id,))

    async def still_open(self, radacct_ids: Sequence[int], timeout: float) -> set[int]:
        found: set[int] = set()
        async with self._connection(timeout) as cur:
            for part in sql.chunks(list(radacct_ids)):
                await cur.execute(sql.mysql_still_open(len(part)), list(part))
                found |= {int(r[0]) for r in await cur.fetchall()}
        return found

    async def group_defined(self, group: str, timeout: float) -> bool:
        async with self._connection(timeout) as cur:
            await cur.execute(sql.MYSQL_GROUP_DEFINED, (group, group))
            row = await cur.fetchone()
        return bool(row and row[0])

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            pool.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(pool.wait_closed(), 5)

    @contextlib.asynccontextmanager
    async def _connection(self, timeout: float, transaction: bool = False) -> AsyncIterator[aiomysql.Cursor]:
        """A cursor on a pooled connection, within `timeout`; in a transaction if asked (committed at the end)."""
        conn = None
        try:
            async with asyncio.timeout(timeout):
                pool = await self._get_pool(timeout)
                conn = await pool.acquire()
                try:
                    if transaction:
                        await conn.begin()
                    async with conn.cursor() as cur:
                        yield cur
                    if transaction:
                        await conn.commit()
                except BaseException:
                    conn.close()  # a half-done statement or transaction: this connection is not reused
                    raise
                finally:
                    pool.release(conn)
        except AgentError:
            raise
        except Exception as exc:
            raise self._mapped(exc, timeout) from None

    async def _get_pool(self, timeout: float) -> aiomysql.Pool:
        async with self._lock:
            if self._pool is None:
                self._pool = await aiomysql.create_pool(minsize=0, maxsize=4, pool_recycle=60,
                                                        connect_timeout=timeout, **self._args)
            return self._pool

    def _mapped(self, exc: BaseException, timeout: float) -> AgentError:
        what = f"radius policy store (credential {self.credential!r})"
        code = exc.args[0] if isinstance(exc, pymysql.MySQLError) and exc.args and isinstance(exc.args[0], int) \
            else None
        text = exc.args[1] if code is not None and len(exc.args) > 1 else exc
        if code in CONFIG_CODES:
            return ConfigError(f"{what}: MySQL error {code}: {clean(text, 200)}: check the DSN in that credential, "
                               f"and that the database has FreeRADIUS's rlm_sql schema and grants")
        if isinstance(exc, TimeoutError | asyncio.TimeoutError) or (code == 2003 and "timed out" in str(text)):
            return NoAnswerError(f"{what}: no answer within {timeout:g}s")
        if code in UNREACHABLE_CODES or isinstance(exc, OSError):
            return UnreachableError(f"{what}: cannot connect: {clean(text, 200)}")
        return TransientError(f"{what}: {type(exc).__name__}: {clean(text, 200)}")
