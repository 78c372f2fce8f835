"""The composition root: settings in, wired components out, one lifecycle.

Start order: database pool -> readiness checks -> drivers -> inventory -> reporter/acceptor ->
executor -> consumer -> listener -> HTTP -> READY=1. Shutdown runs the other way: STOPPING=1, stop
reading, let in-flight work finish within AGENT_DRAIN_TIMEOUT, commit its reports, release what
did not finish so the next reader gets it at once, record the stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import signal
import socket
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import asyncpg

from agent import __version__
from agent.db.connect import DB_ERRORS, reason
from agent.db.connect import classify as classify_connect_error
from agent.db.identity import STALE_FACTOR, host_identity, new_instance, register
from agent.db.leadership import Leadership
from agent.db.pooler import check_prepared_statements, check_session
from agent.db.queries import Queries
from agent.db.retention import Retention
from agent.db.schema import check_ready, ensure_notify
from agent.db.session import Session
from agent.drivers.base import CredentialStore, DriverContext
from agent.drivers.registry import Drivers
from agent.executor.acceptor import Acceptor, GuardLimits
from agent.executor.budgets import DeviceBudgets
from agent.executor.claims import DeviceClaims
from agent.executor.converge import call_timeout
from agent.executor.deadlines import Deadlines
from agent.executor.executor import Executor, op_bound
from agent.executor.lanework import LaneWorks
from agent.executor.parking import Parking
from agent.executor.policy import RetryPolicy, Tuning
from agent.inventory.cache import Inventory
from agent.model.device import Device
from agent.queue.consumer import Consumer
from agent.queue.reports import Reporter
from agent.reconcile.messages import ReconcileMessages
from agent.reconcile.reconciler import Reconciler
from agent.reconcile.worker import ReconcileTuning, SyncWorker
from agent.runtime import collector
from agent.runtime.endpoint import Endpoint
from agent.runtime.housekeeper import Housekeeper, Identity, Sources
from agent.runtime.metrics import Metrics, starting_registry
from agent.runtime.systemd import Notifier
from agent.settings import LiveBox, LiveSettings, Settings, load_settings, reloaded
from agent.vpn.guard import VpnGuard

log = logging.getLogger("agent.runtime.daemon")
T = TypeVar("T")


async def connect_pool(settings: Settings, attempts: int | None = None,
                       notifier: Notifier | None = None) -> asyncpg.Pool:
    """Open the pool, retrying with jittered backoff while the database is unreachable. A refusal
    that retrying cannot heal (password, role, database name, sslmode, a malformed URL) raises
    ConfigError at once, naming AGENT_DATABASE_URL without its password."""
    delay, tried = 1.0, 0
    while True:
        tried += 1
        try:
            return await asyncpg.create_pool(
                settings.database_url, min_size=1, max_size=settings.pool_size, timeout=5, command_timeout=30,
                max_inactive_connection_lifetime=settings.pool_idle_timeout,
                statement_cache_size=settings.statement_cache_size,
                server_settings={"application_name": "agentd"}, reset=_keep_session)
        except (*DB_ERRORS, ValueError, ArithmeticError) as exc:
            if refused := classify_connect_error(exc, settings.database_url):
                raise refused from None
            if attempts is not None and tried >= attempts:
                raise
            why = reason(exc)
            log.warning("database unreachable (%s); retrying in %.0fs", why, delay,
                        extra={"action": "db_unreachable"})
            if notifier:
                notifier.status(f"starting: database unreachable ({why})")
            await asyncio.sleep(delay * random.uniform(0.7, 1.0))
            delay = min(delay * 2, 30.0)


async def _keep_session(_conn: asyncpg.Connection) -> None:
    """Pool connections carry no session state (no SET, LISTEN or advisory locks: those live on
    dedicated connections), so asyncpg's reset query on every release is a wasted round trip."""


class Agent:
    """All components of one daemon, wired from settings."""

    def __init__(self, settings: Settings, pool: asyncpg.Pool, drivers: Drivers | None = None,
                 notifier: Notifier | None = None, force_stop: asyncio.Event | None = None,
                 settings_path: Path | None = None, endpoint: Endpoint | None = None) -> None:
        s = self.settings = settings  # as started: the live ones are read through self.live (below)
        self.endpoint = endpoint  # the HTTP endpoint run() serves from the first second, if any
        self.settings_path = settings_path  # what SIGHUP re-reads
        self.force_stop = force_stop or asyncio.Event()  # a second SIGTERM/SIGINT: skip the drain
        self.pool = pool
        self.notifier = notifier or Notifier()
        self.queries = Queries(s.queue)
        self.instance = new_instance()  # this process: what holds device claims (agent/db/identity.py)
        self.host_id = host_identity()
        # the live settings: one frozen snapshot that SIGHUP swaps whole; every part reads it at each use
        self.live = LiveBox(LiveSettings.of(s))
        self.drivers = drivers or Drivers(DriverContext(lambda: self.live.current().device_timeout,
                                                        CredentialStore(s.credentials_dir)))
        self.inventory = Inventory(pool, self.queries, s.site, self.drivers)
        self.reporter = Reporter(pool, self.queries, s.agent_id, self._committed,
                                 on_failed=self._report_failed, archive=s.archive)
        self.acceptor = Acceptor(pool, self.queries, lambda: guard_limits(s.site, self.live.current()))
        self.claims = DeviceClaims(pool, self.queries, s.agent_id, host=self.host_id, instance=self.instance)
        self.parking = Parking(pool, self.queries)
        self.vpn = VpnGuard(s.require_vpn, s.wg_interface, s.vpn_stale_after, s.vpn_check_interval,
                            lambda: list(self.inventory.devices.values()), pool, s.agent_id, self._reachable,
                            self._probe, s.vpn_probe_interval)
        self.deadlines = Deadlines()
        # every device call is spaced by its device's max_rate and feeds its breaker (per agent)
        self.budgets = DeviceBudgets(self.deadlines, lambda dev: call_timeout(dev, self.live.current().device_timeout),
                                     lambda: self.inventory.devices, self.wake_parked)
        self.drivers.wrap(self.budgets.wrap)
        sync = SyncWorker(
            pool, self.queries, self.drivers, self.deadlines, self.gate,
            lambda: ((t := self.tuning()).policy, t.device_timeout),
            ReconcileTuning(s.reconcile_confirm, s.reconcile_confirm_delay, s.reconcile_pace,
                            s.reconcile_unreachable_wait),
            may_operate=lambda dev: self.claims.fresh(dev.id, op_bound(dev, self.live.current().device_timeout)),
            may_turn_off=self._may_turn_off)
        self.executor = Executor(self.acceptor, self.drivers, self.reporter, self.tuning, s.concurrency,
                                 gate=self.gate, on_unreachable=self.vpn.device_failed, confirm=self.vpn.confirm,
                                 claims=self.claims, deadlines=self.deadlines, coalesce=s.coalesce)
        sync.make_way = lambda dev: self.executor.make_way(dev.id)  # a reconcile lets waiting commands go first
        # the kinds of lane work, asked in this order: commands last, they take every message no other kind claims
        self.lane_work = LaneWorks(ReconcileMessages(sync), self.executor.commands(s.max_message_bytes))
        self.consumer = Consumer(pool, self.queries, s, self.executor, self.inventory, self.lane_work,
                                 settling=self.reporter.settling, on_read=self._read, live=self.live.current)
        self.executor.ask_for_more(self.consumer)  # the one loop: a lane's take is filled from the queue
        self.session = Session(
            s.session_dsn,
            {self.queries.channel: lambda _payload: self.consumer.wake("notify"),
             "agent_inventory": lambda site: self.inventory.changed() if site in ("", s.site) else None},
            on_connect=self._listening, name=f"agentd session {s.agent_id}",
            check_interval=s.listener_check_interval)
        self.leadership = Leadership(self.session, s.site, s.leader_check_interval)  # listens for step-downs
        self.reconciler = Reconciler(self.queries, s.site, s.agent_id, s.schedule, s.reconcile_batch,
                                     Retention.from_settings(s))
        self.house = Housekeeper(
            Identity(s.agent_id, s.site, s.queue, self.instance, self.host_id),
            Sources(consumer=self.consumer.figures, session=self.session.figures, vpn=self.vpn.figures,
                    budgets=self.budgets.figures, reconciler=self.reconciler.figures,
                    leading=lambda: self.leadership.leading, parked=lambda: self.parking.count),
            self.notifier, pool, self.queries, self.live.current)
        self.metrics = Metrics(s.site, s.queue, self.house.live)
        self._tasks: set[asyncio.Task[None]] = set()

    def tuning(self) -> Tuning:
        """The retry policy and device timeout in force (live settings), for commands and reconcile work."""
        live = self.live.current()
        return Tuning(RetryPolicy(live.max_attempts, live.retry_base, live.retry_max), live.device_timeout)

    def gate(self, device: Device) -> str | None:
        """May this device be worked on now? A reason to park its work: the VPN guard's (tunnel down,
        device paused), else its breaker's (too many timeouts in a row); None when it may."""
        return self.vpn.gate(device) or self.budgets.gate(device)

    def _read(self, deliveries) -> None:  # type: ignore[no-untyped-def]
        self.metrics.read(deliveries)
        self.parking.read(deliveries)

    def _background(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reachable(self, devices: list[str]) -> None:
        """The VPN guard sees these devices reachable again (or resumed): their breakers forget the
        tunnel's timeouts, their parked work goes now."""
        self.budgets.reachable(devices)
        await self.wake_parked(devices)

    async def wake_parked(self, devices) -> None:  # type: ignore[no-untyped-def]
        """The devices are reachable again: their parked work becomes visible now."""
        try:
            woken = await self.parking.wake(devices)
        except DB_ERRORS as exc:  # they still come back at the end of their (capped) backoff
            log.warning("could not wake parked work: %s", exc, extra={"action": "unpark_failed"})
            return
        if woken:
            self.consumer.wake("unpark")

    def _report_failed(self, _why: str) -> None:
        self.metrics.report_failures.inc()
        self.consumer.progressed()  # an attempt: the database is failing, not the agent

    def _committed(self, outcomes, lost) -> None:  # type: ignore[no-untyped-def]
        self.consumer.committed(outcomes, lost)
        done = [o for o in outcomes if o.delivery.msg_id not in lost]
        if late := self.parking.committed(done):  # woken while being parked again: wake again
            self._background(self.wake_parked(late))
        self.metrics.committed(done, len(lost))
        self.house.committed(done)

    def _listening(self) -> None:
        self.inventory.changed()
        self.consumer.wake("connect")
        self._background(self._ensure_notify())

    async def _ensure_notify(self) -> None:
        """After every (re)connect: a Postgres crash empties PGMQ's UNLOGGED notify-throttle table,
        and with it every insert notification, silently. Re-enable them if so."""
        try:
            async with self.pool.acquire() as conn:
                again = await ensure_notify(conn, self.settings.queue, self.settings.notify_throttle_ms)
        except DB_ERRORS as exc:
            log.warning("could not check insert notifications: %s", exc, extra={"action": "notify_check_failed"})
            return
        if again:
            log.warning("PGMQ insert notifications were off (a Postgres crash empties their UNLOGGED "
                        "throttle table): re-enabled", extra={"action": "notify_reenabled"})
            self.consumer.wake("connect")

    async def start(self, session: bool = True) -> None:
        """Readiness checks, then the inventory and the tunnel. `session`: this run will use the session
        connection (not `agentd --once`), so it must be a real session."""
        await self._check_poolers(session)
        async with self.pool.acquire() as conn:
            await check_ready(conn, self.settings.queue, self.settings.site)
            if await ensure_notify(conn, self.settings.queue, self.settings.notify_throttle_ms):
                log.warning("PGMQ insert notifications were off (a Postgres crash empties their UNLOGGED "
                            "throttle table): re-enabled", extra={"action": "notify_reenabled"})
        await self.inventory.load()
        for name in {d.driver for d in self.inventory.devices.values()}:
            self.drivers.get(name)  # every driver the inventory needs loads now, not on first command
        await self.vpn.wait_for_tunnel(self.settings.vpn_grace, self.notifier.status)
        s = self.settings  # last: a start that fails before has not taken the agent id
        async with self.pool.acquire() as conn:
            await register(conn, self.queries, s.agent_id, self.instance, self.host_id,
                           {"site": s.site, "queue": s.queue, "host": socket.gethostname(), "pid": os.getpid(),
                            "version": __version__}, STALE_FACTOR * self.live.current().heartbeat_interval)

    async def _check_poolers(self, session: bool) -> None:
        """A pooler in between set up wrongly (PgBouncer in transaction mode for the session connection,
        or keeping no prepared statements while asyncpg caches them) is a configuration error now, not
        two leaders or a pool that limps. So is a separate AGENT_SESSION_DATABASE_URL that the server
        refuses; unreachable is fine: the session connection retries that by itself."""
        s = self.settings
        separate = bool(s.session_database_url) and s.session_database_url != s.database_url
        if session or separate:
            await check_session(s.session_dsn, "AGENT_SESSION_DATABASE_URL" if separate else "AGENT_DATABASE_URL",
                                is_pool_url=not separate, real_session=session)
        if s.statement_cache_size > 0 and (separate or not session):  # else a real session was just proven
            await check_prepared_statements(s.database_url)

    async def _probe(self, device: Device) -> None:
        with self.deadlines.limit(self.live.current().device_timeout):  # a probe without answer feeds the breaker
            await self.drivers.get(device.driver).probe(device)

    async def run_forever(self, stop: asyncio.Event, reload: asyncio.Event | None = None) -> None:
        services: dict[str, Coroutine[Any, Any, None]] = {
            "reporter": self.reporter.run(), "acceptor": self.acceptor.run(), "session": self.session.run(),
            "housekeeper": self.house.run(), "deadlines": self.deadlines.run(), "vpn": self.vpn.run(),
            "claims": self.claims.run(), "budgets": self.budgets.run(),
            "leader": self.leadership.run(self.reconciler.lead)}
        if self.settings.consume:
            services |= {"consumer": self.consumer.run(), "leases": self.consumer.keep_leases()}
        if self.notifier.watchdog_interval:
            services["watchdog"] = self.house.watch()
        tasks: dict[asyncio.Task[None], str] = {
            asyncio.create_task(coro, name=name): name for name, coro in services.items()}
        runner = await self._serve_http()
        with contextlib.suppress(TimeoutError):  # READY once LISTEN is up too (bounded: it may be down)
            await asyncio.wait_for(self.session.connected.wait(), 10)
        await self.house.sample_queue()
        self.house.started()
        await self.house.beat(None)
        log.info("agent running", extra={"action": "started", "site": self.settings.site,
                                         "queue": self.settings.queue})
        try:
            died = await self._wait(stop, reload or asyncio.Event(), tasks)
            await self.shutdown(tasks, died)
        finally:
            if runner is not None:
                await runner.cleanup()
        for t in died:
            raise RuntimeError(f"service {tasks[t]} stopped: {t.exception() or 'returned'}")

    async def _wait(self, stop: asyncio.Event, reload: asyncio.Event,
                    tasks: dict[asyncio.Task[None], str]) -> list[asyncio.Task[None]]:
        while True:
            waiters = [asyncio.create_task(stop.wait()), asyncio.create_task(reload.wait())]
            done, _ = await asyncio.wait([*waiters, *tasks], return_when=asyncio.FIRST_COMPLETED)
            for w in waiters:
                w.cancel()
            died = [t for t in tasks if t in done]
            if died or stop.is_set():
                return died
            reload.clear()
            await self.reload()

    async def _serve_http(self):  # type: ignore[no-untyped-def]
        """Publish the running agent's figures on the endpoint run() started (or, for an Agent built
        without one, start it now); returns what to clean up, if this started it."""
        hp = self.settings.http_host_port
        if hp is None:
            return None
        endpoint, runner = self.endpoint, None
        if endpoint is None:
            endpoint = Endpoint(lambda: "starting")
            runner = await endpoint.start(*hp)
        endpoint.serve(ready=self.house.ready, status=self.house.snapshot,
                       registry=self.metrics.registry, before_scrape=self.house.sample_queue)
        return runner

    async def reload(self) -> None:
        """SIGHUP: re-read settings and inventory; settings that need a restart are named."""
        self.notifier.reloading()
        log.info("reloading configuration and inventory", extra={"action": "reloading"})
        try:
            new = load_settings(self.settings_path)
        except Exception as exc:
            log.error("reload refused, keeping the running configuration: %s", exc, extra={"action": "reload_failed"})
        else:
            self._apply(new)
        with contextlib.suppress(*DB_ERRORS):
            await self.inventory.load()
        self.notifier.ready(self.house.status_line())

    async def _may_turn_off(self, device: str, service: str) -> bool:
        """Whether the guard against mass suspension lets reconciliation turn this service off."""
        site, off_min, percent, window = self.acceptor.guard().args()
        if off_min is None:  # no guard
            return True
        async with self.pool.acquire() as conn:
            return bool(await conn.fetchval(self.queries.guard_repair, site, device, service, off_min, percent, window))

    def _apply(self, new: Settings) -> None:
        """Swap the live snapshot whole; the settings that need a restart keep their start values."""
        live, restart = reloaded(self.settings, new)
        if restart:
            log.warning("settings changed that need a restart: %s", ", ".join(restart),
                        extra={"action": "reload_partial"})
        self.live.swap(live)
        logging.getLogger().setLevel(live.log_level)

    async def shutdown(self, tasks: dict[asyncio.Task[None], str], died: list[asyncio.Task[None]]) -> None:
        self.house.stopping()
        self.consumer.stop()
        if leader := next((t for t, name in tasks.items() if name == "leader" and not t.done()), None):
            await self.leadership.stop(leader)  # a standby takes over now, not at its next try
        log.info("stopping: draining in-flight work", extra={"action": "stopping"})
        if not died and not self.force_stop.is_set():
            drained = asyncio.create_task(self._drained())
            forced = asyncio.create_task(self.force_stop.wait())
            await asyncio.wait([drained, forced], timeout=self.settings.drain_timeout,
                               return_when=asyncio.FIRST_COMPLETED)
            drained.cancel()
            forced.cancel()
            if not drained.done() or drained.cancelled():
                log.warning("drain incomplete: unfinished messages are released for the next reader",
                            extra={"action": "drain_incomplete"})
        with contextlib.suppress(*DB_ERRORS):
            await self.consumer.release_unfinished()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        with contextlib.suppress(*DB_ERRORS):
            await self.house.beat("stopped")

    async def unregister(self) -> None:
        """Mark this process's row in agent.agents stopped, if it is not yet (`agentd --once` done):
        another process may take the agent id at once."""
        with contextlib.suppress(*DB_ERRORS):
            async with self.pool.acquire(timeout=5) as conn:
                await conn.execute(self.queries.unregister_agent, self.settings.agent_id, self.instance, timeout=5)

    async def _drained(self) -> None:
        await self.executor.idle()
        await self.reporter.drained()

    async def drain_once(self, stop: asyncio.Event) -> int:
        """`agentd --once`: work until the queue is empty; 0 if everything succeeded."""
        helpers = [asyncio.create_task(self.reporter.run()), asyncio.create_task(self.acceptor.run()),
                   asyncio.create_task(self.deadlines.run()), asyncio.create_task(self.claims.run())]
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
            for t in helpers:
                t.cancel()
        o = self.consumer.outcomes
        async with self.pool.acquire() as conn:
            left = await conn.fetchval(self.queries.queue_depth)
        await self.unregister()
        log.info("queue drained: %d done, %d retry later, %d dead-lettered; %d message(s) still queued "
                 "(delayed, retrying or leased elsewhere)", o["archive"], o["retry"], o["dead_letter"], left,
                 extra={"action": "drained"})
        return 1 if o["retry"] or o["dead_letter"] else 0


async def run(settings: Settings, *, once: bool = False, drivers: Drivers | None = None,
              config_path: str | Path | None = None) -> int:
    stop, reload, force = asyncio.Event(), asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, _on_signal, stop, force)
    loop.add_signal_handler(signal.SIGHUP, reload.set)
    notifier = Notifier()
    notifier.status("starting: connecting to the database")
    endpoint = runner = None
    if not once and (hp := settings.http_host_port) is not None:  # /readyz and /status from the first second
        endpoint = Endpoint(lambda: notifier.last_status, starting_registry(settings.site, settings.queue))
        runner = await endpoint.start(*hp)
    try:
        connecting = await _until_stopped(connect_pool(settings, attempts=3 if once else None, notifier=notifier),
                                          stop)
        if connecting is None:
            return 0
        pool = connecting.result()
        agent = Agent(settings, pool, drivers, notifier, force, Path(config_path) if config_path else None,
                      endpoint)
        try:
            if (starting := await _until_stopped(agent.start(session=not once), stop)) is None:
                return 0
            starting.result()
            collector.settle()
            if once:
                return await agent.drain_once(stop)
            await agent.run_forever(stop, reload)
            log.info("stopped", extra={"action": "stopped"})
            return 130 if force.is_set() else 0
        finally:
            await agent.drivers.close()
            await pool.close()
    finally:
        if runner is not None:
            await runner.cleanup()


def _on_signal(stop: asyncio.Event, force: asyncio.Event) -> None:
    if stop.is_set():  # a second signal: stop at once, releasing what is unfinished
        log.warning("second signal: stopping now without waiting for in-flight work", extra={"action": "forced"})
        force.set()
    stop.set()


async def _until_stopped(coro: Coroutine[Any, Any, T], stop: asyncio.Event) -> asyncio.Task[T] | None:
    """Start-up may wait long (for the database, for the tunnel): a signal meanwhile ends it cleanly.
    The finished task (its result or exception), or None when a signal came first."""
    task = asyncio.create_task(coro)
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait([task, stopper], return_when=asyncio.FIRST_COMPLETED)
    stopper.cancel()
    if task.done():
        return task
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return None


def guard_limits(site: str, live: LiveSettings) -> GuardLimits:
    return GuardLimits(site, live.guard_off_min, live.guard_off_percent, live.guard_window)
