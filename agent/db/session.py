"""The session connection: the one dedicated (unpooled) connection an agent holds.

Everything that needs session state lives on it: LISTEN for the queue's insert notifications and
inventory changes, and the site's leadership (a session-level advisory lock, and every statement the
leader makes). Every other statement goes through the pool, which may sit behind PgBouncer in
transaction mode; this connection may bypass it (AGENT_SESSION_DATABASE_URL).

Statements on it run one at a time (asyncpg allows no overlap) and each is short, so notifications
are never held up for long. A dead connection is found by TCP keepalives, asyncpg's termination
callback, and a `SELECT 1` with a deadline when nothing else ran on it for AGENT_LISTENER_CHECK_INTERVAL
seconds; then it reconnects with jittered exponential backoff. Each connection is one *generation*:
what was set up on the old one (LISTEN, the leader's lock) is gone, and a caller that bound itself
to a generation gets `SessionLost` instead of running on the new one by mistake.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg

from agent.db.connect import DB_ERRORS, reason

log = logging.getLogger("agent.session")
KEEPALIVE = (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3))  # a dead peer found in ~25 s
SLACK = 1.0  # the liveness check waits this long past the interval, so a caller's periodic statement counts


class SessionLost(ConnectionError):
    """The connection a caller bound itself to is gone (or there is none right now)."""


@dataclass(frozen=True)
class SessionFigures:
    """What the session connection tells the housekeeper and the metrics."""

    connected: bool
    error: str | None   # why it is down, while it reconnects
    reconnects: int     # lost or failed to connect, each time


class Session:
    def __init__(self, dsn: str, channels: dict[str, Callable[[str], None]], on_connect: Callable[[], None],
                 name: str, check_interval: float = 30.0, max_backoff: float = 30.0) -> None:
        self._dsn = dsn
        self._channels = dict(channels)
        self._on_connect = on_connect
        self._name = name[:63]
        self.check_interval = check_interval
        self._max_backoff = max_backoff
        self._conn: asyncpg.Connection | None = None
        self._lock = asyncio.Lock()
        self._changed = asyncio.Condition()
        self._last_ok = 0.0
        self.generation = 0
        self.connected = asyncio.Event()
        self.reconnects = 0
        self.error: str | None = None  # why the connection is down, while it is

    def subscribe(self, channel: str, callback: Callable[[str], None]) -> None:
        """LISTEN on `channel` on every connection from the next one on (one made before `run`: all of them)."""
        self._channels[channel] = callback

    def figures(self) -> SessionFigures:
        return SessionFigures(self.connected.is_set(), self.error, self.reconnects)

    # -- statements ---------------------------------------------------------------------

    async def fetch(self, query: str, *args: Any, generation: int | None = None,
                    timeout: float = 30) -> list[asyncpg.Record]:
        return await self._run("fetch", query, args, generation, timeout)  # type: ignore[no-any-return]

    async def fetchval(self, query: str, *args: Any, generation: int | None = None, timeout: float = 30) -> Any:
        return await self._run("fetchval", query, args, generation, timeout)

    async def execute(self, query: str, *args: Any, generation: int | None = None, timeout: float = 30) -> str:
        return await self._run("execute", query, args, generation, timeout)  # type: ignore[no-any-return]

    async def _run(self, how: str, query: str, args: tuple[Any, ...], generation: int | None,
                   timeout: float) -> Any:
        async with self._lock:
            conn = self._current(generation)
            async with _torn(conn):
                result = await getattr(conn, how)(query, *args, timeout=timeout)
        self._last_ok = time.monotonic()
        return result

    async def listen(self, channel: str, callback: Callable[[str], None], generation: int) -> Callable[[], Any]:
        """LISTEN on this generation's connection; returns the coroutine function that stops it."""
        handler = _handler(callback)
        async with self._lock:
            conn = self._current(generation)
            async with _torn(conn):
                await conn.add_listener(channel, handler)

        async def unlisten() -> None:
            async with self._lock:
                if self._conn is conn and conn is not None and not conn.is_closed():
                    async with _torn(conn):
                        await conn.remove_listener(channel, handler)
        return unlisten

    def _current(self, generation: int | None) -> asyncpg.Connection:
        conn = self._conn
        if conn is None or conn.is_closed():
            raise SessionLost(f"the session connection is down ({self.error or 'reconnecting'})")
        if generation is not None and generation != self.generation:
            raise SessionLost("the session connection was replaced")
        return conn

    async def connection(self) -> int:
        """Wait until connected; the generation of the connection."""
        async with self._changed:
            await self._changed.wait_for(lambda: self._conn is not None)
            return self.generation

    async def lost(self, generation: int) -> None:
        """Return once the connection of `generation` is gone."""
        async with self._changed:
            await self._changed.wait_for(lambda: self.generation != generation or self._conn is None)

    def restart(self) -> None:
        """Drop the connection (and with it everything held on it); the run loop reconnects."""
        if self._conn is not None:
            self._conn.terminate()

    # -- the loop -----------------------------------------------------------------------

    async def run(self) -> None:
        delay = 0.5
        while True:
            conn: asyncpg.Connection | None = None
            try:
                conn = await self._connect()
                delay = 0.5
                await self._watch(conn)
            except DB_ERRORS as exc:
                why = reason(exc)
                if self.error is None:  # one line per state change, not one per attempt
                    log.warning("session connection lost: %s; reconnecting", why, extra={"action": "listener_lost"})
                else:
                    log.debug("session connection still down: %s", why, extra={"action": "listener_retry"})
                self.error = why
            finally:
                await self._set(None)
                if conn is not None:
                    conn.terminate()
            self.reconnects += 1
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, self._max_backoff)

    async def _connect(self) -> asyncpg.Connection:
        conn = await asyncpg.connect(self._dsn, timeout=10, statement_cache_size=0,
                                     server_settings={"application_name": self._name})
        try:
            _keepalive(conn)
            for channel, callback in self._channels.items():
                await conn.add_listener(channel, _handler(callback))
        except BaseException:
            conn.terminate()
            raise
        was_down, self.error = self.error, None
        self._last_ok = time.monotonic()
        await self._set(conn)
        log.info("session connection up%s", " again" if was_down else "",
                 extra={"action": "listening", "channels": list(self._channels)})
        self._on_connect()  # LISTEN first, then read: nothing inserted meanwhile is missed
        return conn

    async def _set(self, conn: asyncpg.Connection | None) -> None:
        async with self._changed:
            if conn is not None:
                self.generation += 1
                self.connected.set()
            else:
                self.connected.clear()
            self._conn = conn
            self._changed.notify_all()

    async def _watch(self, conn: asyncpg.Connection) -> None:
        lost = asyncio.Event()
        conn.add_termination_listener(lambda _c: lost.set())
        while not lost.is_set():
            wait = self._last_ok + self.check_interval + SLACK - time.monotonic()
            if wait > 0:
                with contextlib.suppress(TimeoutError):  # asyncio.timeout: see agent/reconcile/reconciler.py
                    async with asyncio.timeout(wait):
                        await lost.wait()
                continue
            await self.fetchval("SELECT 1", timeout=min(10.0, self.check_interval))
        raise ConnectionError("server closed the connection")


@contextlib.asynccontextmanager
async def _torn(conn: asyncpg.Connection) -> AsyncIterator[None]:
    """A connection the server ended while a statement was under way leaves asyncpg's protocol in a
    state where the next statement fails with InternalClientError: it is a lost connection."""
    try:
        yield
    except asyncpg.InternalClientError as exc:
        conn.terminate()
        raise SessionLost(f"the session connection broke ({exc})") from exc


def _handler(callback: Callable[[str], None]) -> Callable[..., None]:
    return lambda _conn, _pid, _channel, payload: callback(payload)


def _keepalive(conn: asyncpg.Connection) -> None:
    """TCP keepalives on the session socket (a no-op on Unix sockets)."""
    transport = getattr(conn, "_transport", None)
    sock = transport.get_extra_info("socket") if transport else None
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for opt, value in KEEPALIVE:
        if hasattr(socket, opt):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, opt), value)
