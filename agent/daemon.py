"""The composition root: settings in, wired components out, one lifecycle.

Start order: database pool -> readiness checks -> drivers -> inventory -> reporter -> executor ->
consumer -> listener -> HTTP. Shutdown runs the other way: stop reading, let in-flight work
finish within AGENT_DRAIN_TIMEOUT, commit its reports, release what did not finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import signal
from collections.abc import Coroutine
from typing import Any

import asyncpg

from agent import http
from agent.db.queries import Queries
from agent.db.schema import check_ready, ensure_notify
from agent.drivers.base import CredentialStore, DriverContext
from agent.drivers.registry import Drivers
from agent.executor.acceptor import Acceptor
from agent.executor.executor import Executor
from agent.executor.policy import RetryPolicy
from agent.executor.reports import Reporter
from agent.inventory import Inventory
from agent.queue.consumer import Consumer
from agent.queue.listener import Listener, queue_channel
from agent.settings import Settings

log = logging.getLogger("agent.daemon")


async def connect_pool(settings: Settings, attempts: int | None = None) -> asyncpg.Pool:
    """Open the pool, retrying with jittered backoff while the database is unreachable."""
    delay, tried = 1.0, 0
    while True:
        tried += 1
        try:
            return await asyncpg.create_pool(
                settings.database_url, min_size=1, max_size=6, timeout=10,
                server_settings={"application_name": "agentd"})
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            if attempts is not None and tried >= attempts:
                raise
            log.warning("database unreachable (%s); retrying in %.0fs", exc, delay,
                        extra={"action": "db_unreachable"})
            await asyncio.sleep(delay * random.uniform(0.7, 1.0))
            delay = min(delay * 2, 30.0)


class Agent:
    """All components of one daemon, wired from settings."""

    def __init__(self, settings: Settings, pool: asyncpg.Pool, drivers: Drivers | None = None) -> None:
        s = self.settings = settings
        self.pool = pool
        self.queries = Queries(s.queue)
        self.drivers = drivers or Drivers(DriverContext(s.device_timeout, CredentialStore(s.credentials_dir)))
        self.inventory = Inventory(pool, self.queries, s.site, self.drivers)
        self.reporter = Reporter(pool, self.queries, s.agent_id, self._committed)
        self.acceptor = Acceptor(pool, self.queries)
        self.executor = Executor(self.acceptor, self.drivers, self.reporter,
                                 RetryPolicy(s.max_attempts, s.retry_base, s.retry_max),
                                 s.concurrency, s.device_timeout)
        self.consumer = Consumer(pool, self.queries, s, self.executor, self.inventory)
        self.listener = Listener(
            s.database_url,
            {queue_channel(s.queue): lambda: self.consumer.wake("notify"),
             "agent_inventory": self.inventory.changed},
            on_connect=self._listening, check_interval=s.listener_check_interval)
        self.ready = False

    def _committed(self, outcomes, lost) -> None:  # type: ignore[no-untyped-def]
        self.consumer.committed(outcomes, lost)

    def _listening(self) -> None:
        self.inventory.changed()
        self.consumer.wake("connect")

    def readiness(self) -> tuple[bool, dict[str, object]]:
        return self.ready and self.listener.connected.is_set(), {
            "listener": self.listener.connected.is_set(), "inflight": len(self.consumer.inflight)}

    async def start(self) -> None:
        async with self.pool.acquire() as conn:
            await check_ready(conn, self.settings.queue)
            if await ensure_notify(conn, self.settings.queue, self.settings.notify_throttle_ms):
                log.warning("PGMQ insert notifications were off (a Postgres crash empties their UNLOGGED "
                            "throttle table): re-enabled", extra={"action": "notify_reenabled"})
        await self.inventory.load()

    async def run_forever(self, stop: asyncio.Event) -> None:
        services: dict[str, Coroutine[Any, Any, None]] = {
            "reporter": self.reporter.run(), "acceptor": self.acceptor.run(), "consumer": self.consumer.run(),
            "leases": self.consumer.keep_leases(), "listener": self.listener.run()}
        tasks: dict[asyncio.Task[None], str] = {
            asyncio.create_task(coro, name=name): name for name, coro in services.items()}
        runner = None
        if (hp := self.settings.http_host_port) is not None:
            runner = await http.start(*hp, self.readiness)
        self.ready = True
        log.info("agent running", extra={"action": "started", "site": self.settings.site,
                                         "queue": self.settings.queue})
        stopper = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait([stopper, *tasks], return_when=asyncio.FIRST_COMPLETED)
        died = [t for t in tasks if t in done]
        try:
            await self.shutdown(tasks, died)
        finally:
            stopper.cancel()
            if runner is not None:
                await runner.cleanup()
        for t in died:
            raise RuntimeError(f"service {tasks[t]} stopped: {t.exception() or 'returned'}")

    async def shutdown(self, tasks: dict[asyncio.Task[None], str], died: list[asyncio.Task[None]]) -> None:
        self.ready = False
        self.consumer.stop()
        log.info("stopping: draining in-flight work", extra={"action": "stopping"})
        if not died:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.drain_timeout):
                    await self.executor.idle()
                    await self.reporter.drained()
        with contextlib.suppress(Exception):
            await self.consumer.release_unfinished()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def drain_once(self, stop: asyncio.Event) -> int:
        """`agentd --once`: work until the queue is empty; 0 if everything succeeded."""
        reporter = asyncio.create_task(self.reporter.run())
        acceptor = asyncio.create_task(self.acceptor.run())
        try:
            while not stop.is_set():
                taken = await self.consumer.read_until_short()
                await self.executor.idle()
                await self.reporter.drained()
                if taken == 0 and not self.consumer.inflight:
                    break
        finally:
            await self.executor.idle()
            await self.reporter.drained()
            reporter.cancel()
            acceptor.cancel()
        o = self.consumer.outcomes
        async with self.pool.acquire() as conn:
            left = await conn.fetchval(self.queries.queue_depth)
        log.info("queue drained: %d done, %d retry later, %d dead-lettered; %d message(s) still queued "
                 "(delayed, retrying or leased elsewhere)", o["archive"], o["retry"], o["dead_letter"], left,
                 extra={"action": "drained"})
        return 1 if o["retry"] or o["dead_letter"] else 0


async def run(settings: Settings, *, once: bool = False, drivers: Drivers | None = None) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, _on_signal, stop, loop)
    pool = await connect_pool(settings, attempts=3 if once else None)
    agent = Agent(settings, pool, drivers)
    try:
        await agent.start()
        if once:
            return await agent.drain_once(stop)
        await agent.run_forever(stop)
        log.info("stopped", extra={"action": "stopped"})
        return 0
    finally:
        await agent.drivers.close()
        await pool.close()


def _on_signal(stop: asyncio.Event, loop: asyncio.AbstractEventLoop) -> None:
    if stop.is_set():  # a second signal: stop at once; unfinished messages return after their lease
        log.warning("second signal: exiting now", extra={"action": "killed"})
        raise SystemExit(130)
    stop.set()
