"""The LISTEN connection: dedicated, never pooled, never in a transaction.

A notification is only a hint: on every (re)connect the owner is told so it reads at once.
A dead connection is found by TCP keepalives, asyncpg's termination callback and a periodic
`SELECT 1` with a deadline; then it reconnects with jittered exponential backoff.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
from collections.abc import Callable

import asyncpg

log = logging.getLogger("agent.listener")


def queue_channel(queue: str) -> str:
    """PGMQ's insert-notify channel; it has dots, asyncpg quotes it in LISTEN."""
    return f"pgmq.q_{queue}.INSERT"


class Listener:
    def __init__(self, dsn: str, channels: dict[str, Callable[[], None]], on_connect: Callable[[], None],
                 check_interval: float = 30.0, max_backoff: float = 30.0) -> None:
        self._dsn = dsn
        self._channels = channels
        self._on_connect = on_connect
        self._check_interval = check_interval
        self._max_backoff = max_backoff
        self.connected = asyncio.Event()
        self.reconnects = 0

    async def run(self) -> None:
        delay = 0.5
        while True:
            conn: asyncpg.Connection | None = None
            try:
                conn = await self._connect()
                delay = 0.5
                await self._watch(conn)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
                log.warning("listener connection lost: %s; reconnecting", exc or type(exc).__name__,
                            extra={"action": "listener_lost"})
            finally:
                self.connected.clear()
                if conn is not None:
                    conn.terminate()
            self.reconnects += 1
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, self._max_backoff)

    async def _connect(self) -> asyncpg.Connection:
        conn = await asyncpg.connect(self._dsn, timeout=10,
                                     server_settings={"application_name": "agentd-listener"})
        _keepalive(conn)
        for channel, callback in self._channels.items():
            await conn.add_listener(channel, lambda *_a, cb=callback: cb())
        self.connected.set()
        log.info("listening", extra={"action": "listening", "channels": list(self._channels)})
        self._on_connect()  # LISTEN first, then read: nothing inserted meanwhile is missed
        return conn

    async def _watch(self, conn: asyncpg.Connection) -> None:
        lost = asyncio.Event()
        conn.add_termination_listener(lambda _c: lost.set())
        while not lost.is_set():
            try:
                await asyncio.wait_for(lost.wait(), self._check_interval)
            except TimeoutError:
                await conn.fetchval("SELECT 1", timeout=min(10.0, self._check_interval))
        raise ConnectionError("server closed the connection")


def _keepalive(conn: asyncpg.Connection) -> None:
    """TCP keepalives on the listener socket (a no-op on Unix sockets)."""
    transport = getattr(conn, "_transport", None)
    sock = transport.get_extra_info("socket") if transport else None
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for opt, value in (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, opt):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, opt), value)
