"""At start, whether a connection pooler in between (PgBouncer and the like) is set up as the agent needs.

- The session connection holds LISTEN and the site leader's advisory lock, which live on one server
  backend as long as the connection lives. Through a pooler in transaction or statement mode, each
  statement may run on another backend and the backend serves other clients in between: a second
  agent gets the leader's lock too (it is re-entrant) and notifications land on random backends,
  silently. So the session URL must reach Postgres directly or a pool in session mode.
- asyncpg prepares statements by name and reuses them (AGENT_STATEMENT_CACHE_SIZE). Through
  transaction pooling without prepared-statement support (PgBouncer before 1.21, or
  max_prepared_statements = 0) a name prepared on one backend is missing on the next ("does not
  exist") or taken by another client ("already exists"), and every pooled statement limps.

Both are found by what a pooler cannot hide. A connection notes its backend; a few more connections
each open a transaction, which pins the backend it runs on, until one lands on the noted backend. A
real session keeps its backend to itself, so none can, and its next statement runs on the same
backend as before, where a statement it prepared still is. Through transaction pooling the noted
backend is idle between statements: a pinning connection gets it (a pooler hands out idle backends
before it opens new ones), and the first connection's next statement runs elsewhere.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

from agent.db.connect import DB_ERRORS, classify, reason, redact
from agent.errors import ConfigError

log = logging.getLogger("agent.pooler")
PID = "SELECT pg_backend_pid()"
PINS = 4  # connections that try to take the noted backend: more than a pooler's idle backends, as a rule
TIMEOUT = 10.0
PIN_TIMEOUT = 3.0  # a session pool with no backend to spare makes a pin wait: then it is no evidence
_PREPARED_LOST = (asyncpg.InvalidSQLStatementNameError, asyncpg.DuplicatePreparedStatementError)


def shares_backend(before: int, pinned: list[int], after: int) -> bool:
    """The backend a connection ran on, those other connections pinned meanwhile, and the one it ran
    on next: a real session keeps one backend, and no other connection gets it."""
    return before in pinned or after != before


async def check_session(dsn: str, setting: str, is_pool_url: bool, real_session: bool = True) -> None:
    """Raise ConfigError if the server refuses `dsn` in a way retrying cannot heal (password, role ...)
    or, with `real_session`, if it does not give a real session. An unreachable server is no error:
    the session connection retries that by itself."""
    try:
        conn = await asyncpg.connect(dsn, timeout=TIMEOUT, statement_cache_size=0)
    except (*DB_ERRORS, ValueError, ArithmeticError) as exc:
        if refused := classify(exc, dsn, setting):
            raise refused from None
        return
    try:
        if real_session and await _shares_backend(dsn, conn, lambda: conn.fetchval(PID, timeout=TIMEOUT)):
            raise ConfigError(_not_a_session(dsn, setting, is_pool_url))
    except _NoTransactions:
        raise ConfigError(_not_a_session(dsn, setting, is_pool_url)) from None
    except DB_ERRORS as exc:
        log.warning("could not check that %s gives a real session: %s", setting, reason(exc),
                    extra={"action": "pooler_unchecked"})
    finally:
        conn.terminate()


def _not_a_session(dsn: str, setting: str, is_pool_url: bool) -> str:
    fix = ("set AGENT_SESSION_DATABASE_URL to Postgres directly or to a PgBouncer database with pool_mode=session"
           if is_pool_url else
           f"point {setting} at Postgres directly or at a PgBouncer database with pool_mode=session")
    return (f"the session connection is not a real session: {setting} ({redact(dsn)}) reaches a pooler in "
            f"transaction or statement mode (its server backend serves other connections between statements), "
            f"so the site leader's lock and LISTEN would not hold; {fix}")


async def check_prepared_statements(dsn: str, setting: str = "AGENT_DATABASE_URL") -> None:
    """Raise ConfigError if a statement prepared on a connection of `dsn` is gone by its next use (a
    pooler in transaction mode without prepared-statement support). Matters with asyncpg's statement cache on."""
    try:
        conn = await asyncpg.connect(dsn, timeout=TIMEOUT, statement_cache_size=0)
    except DB_ERRORS:
        return  # the pool connected a moment ago; a server gone now is the pool's to retry
    try:
        stmt = await conn.prepare(PID, name=f"agent_check_{uuid.uuid4().hex[:12]}", timeout=TIMEOUT)
        await _shares_backend(dsn, conn, lambda: stmt.fetchval(timeout=TIMEOUT))
    except _PREPARED_LOST as exc:
        raise ConfigError(
            f"prepared statements do not survive on the connections of {setting} ({redact(dsn)}): "
            f"{str(exc).splitlines()[0]}, so a pooler in transaction mode is in between. Set "
            f"AGENT_STATEMENT_CACHE_SIZE=0, or enable PgBouncer's prepared statement support "
            f"(max_prepared_statements = 100 or more, PgBouncer 1.21 or later)") from None
    except _NoTransactions:
        raise ConfigError(f"{setting} ({redact(dsn)}) reaches a pooler that refuses transactions (PgBouncer's "
                          f"pool_mode=statement): the agent needs them; use pool_mode=transaction") from None
    except DB_ERRORS as exc:
        log.warning("could not check that prepared statements survive on %s: %s", setting, reason(exc),
                    extra={"action": "pooler_unchecked"})
    finally:
        conn.terminate()


async def _shares_backend(dsn: str, conn: asyncpg.Connection, pid: Callable[[], Awaitable[Any]]) -> bool:
    """Whether `conn`'s backend serves other connections between its statements; `pid` runs a
    statement on `conn` that returns its backend's pid."""
    before = await pid()
    pinned: list[int] = []
    async with contextlib.AsyncExitStack() as pins:
        for _ in range(PINS):
            if (got := await _pin(dsn, pins)) is None:
                break  # a session pool with no backend to spare: nothing more to learn
            pinned.append(got)
            if got == before:
                break
        after = await pid()  # while the pins hold their backends
    return shares_backend(before, pinned, after)


class _NoTransactions(Exception):
    """The pooler refuses transactions (statement pooling): no session, and no place for the agent's
    transactions either."""


async def _pin(dsn: str, pins: contextlib.AsyncExitStack) -> int | None:
    """Another connection in an open transaction (which pins its backend); its backend's pid."""
    try:
        other = await asyncpg.connect(dsn, timeout=TIMEOUT, statement_cache_size=0)
    except DB_ERRORS:
        return None
    pins.callback(other.terminate)
    try:
        await other.execute("BEGIN", timeout=PIN_TIMEOUT)
        return int(await other.fetchval(PID, timeout=PIN_TIMEOUT))
    except DB_ERRORS as exc:
        if "statement pooling" in str(exc):  # PgBouncer: "transaction blocks not allowed in statement pooling mode"
            raise _NoTransactions from None
        return None
