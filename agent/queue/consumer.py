"""The consumer: wake-ups in, batched reads out, deliveries handed to the executor.

Wake sources: `notify` (PGMQ insert trigger), `poll` (slow fallback), `catchup` (the notify
throttle window closed: PGMQ sends no trailing notification), `retry` (a delay we set ran out),
`connect` (after every (re)LISTEN). After any wake it reads until a batch comes back short.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import asyncpg

from agent.db.connect import DB_ERRORS
from agent.db.queries import Queries, as_text
from agent.errors import PermanentError
from agent.executor.executor import Executor
from agent.executor.lanework import LaneWork, LaneWorks
from agent.inventory.cache import Inventory
from agent.model.outcome import Delivery, Outcome
from agent.model.sites import Elsewhere
from agent.queue.admission import admit, delivery
from agent.queue.reports import Settling
from agent.queue.routing import moved, route
from agent.settings import LiveSettings, Settings

log = logging.getLogger("agent.consumer")
MIN_REREAD = 0.05  # seconds: the soonest a look at the queue is repeated for a visible message
# Lanes topped up by one read at most: a burst's first lanes start while the next are read (all 32 of
# AGENT_CONCURRENCY in one read held every lane until it was done; docs/performance.md).
TOP_UP_DEVICES = 8


@dataclass(frozen=True)
class ConsumerFigures:
    """What the consumer tells the housekeeper and the metrics: a copy, taken at once."""

    inflight: int                   # messages read and not yet settled
    wakeups: Mapping[str, int]      # wake-ups by source
    read_error: str | None          # why the last read failed, while it does
    last_progress: float            # monotonic: the last read, dispatch or outcome (agent.runtime.watchdog)
    work_waits: bool                # messages in flight, a backlog, or a read under way
    last_cycle_wall: float | None   # unix time the last read cycle ended
    last_cycle_ms: float | None     # how long it took


class Consumer:
    def __init__(self, pool: asyncpg.Pool, queries: Queries, settings: Settings,
                 executor: Executor, inventory: Inventory, work: LaneWorks, settling: Settling | None = None,
                 on_read: Callable[[list[Delivery]], None] | None = None,
                 live: Callable[[], LiveSettings] | None = None) -> None:
        self._pool = pool
        self._work = work  # the kinds of lane work: which one a message is
        self._settling = settling or Settling()  # held (shared) by the reporter's writes while they commit
        self._q = queries
        self._s = settings  # as started; the poll interval is live, read through `live` at each use
        started = LiveSettings.of(settings)
        self._live = live or (lambda: started)
        self._executor = executor
        self._inventory = inventory
        self.inflight: dict[int, Delivery] = {}
        self.wakeups: Counter[str] = Counter()
        self.outcomes: Counter[str] = Counter()
        self._wake = asyncio.Event()
        self._source = "start"
        self._room = asyncio.Event()
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self.stopping = False
        self.on_read = on_read
        self.db_error: str | None = None
        self.last_progress = time.monotonic()  # the last read, dispatch or outcome: see agent.runtime.watchdog
        self._cycling = False  # a read cycle is under way
        self.last_cycle_wall: float | None = None
        self.last_cycle_ms: float | None = None
        self.backlog = False  # the last read was full (or prefetch held reading back): more is waiting
        # device -> (room, resolved once its top-up read is dispatched): lanes waiting for a top-up
        self._wanted: dict[str, tuple[int, asyncio.Future[None]]] = {}
        self._topping: asyncio.Task[None] | None = None  # the top-up reads, one after another

    # -- wake-ups -------------------------------------------------------------------------

    def wake(self, source: str) -> None:
        self._source = source
        self._wake.set()
        # PGMQ sends nothing for inserts later in a throttle window. After a notification, and after a
        # (re)connect (the window's notification may have gone to nobody), read again when it closes.
        # A notification opens a new window: its catch-up replaces the one still due for the window
        # before (that one closes earlier, and this wake reads what it would have read).
        if source in ("notify", "connect") and self._s.notify_throttle_ms:
            self.wake_later((self._s.notify_throttle_ms + 20) / 1000, "catchup", latest=True)

    def wake_later(self, delay: float, source: str, latest: bool = False) -> None:
        """Wake after `delay` seconds, unless a wake of this source is already due sooner (or, with
        `latest`, replacing one due sooner: the wake must come after the last window closes)."""
        loop = asyncio.get_running_loop()
        when = loop.time() + delay
        timer = self._timers.get(source)
        if (timer is not None and not timer.cancelled() and loop.time() < timer.when()
                and (timer.when() >= when if latest else timer.when() <= when)):
            return
        if timer is not None:
            timer.cancel()
        self._timers[source] = loop.call_at(when, self.wake, source)

    # -- the loop -------------------------------------------------------------------------

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        woke = loop.time()
        while not self.stopping:
            if not await self._woken(woke):
                self._source = "poll"
            self._wake.clear()
            if self.stopping:
                break
            woke = loop.time()
            self.wakeups[self._source] += 1
            started = time.monotonic()
            self._cycling = True
            self.progressed()
            try:
                await self.read_until_short()
                await self._wake_when_next_visible()
            finally:
                self._cycling = False
            self.last_cycle_wall, self.last_cycle_ms = time.time(), round((time.monotonic() - started) * 1000, 2)

    async def _woken(self, since: float) -> bool:
        """Wait for a wake-up; False when AGENT_POLL_INTERVAL since `since` ran out first. The interval
        is a live setting: it is looked at again every second, so a reload shortens a wait under way."""
        loop = asyncio.get_running_loop()
        while (left := since + self._live().poll_interval - loop.time()) > 0:
            try:  # asyncio.timeout, not wait_for: see agent/reconcile/reconciler.py
                async with asyncio.timeout(min(left, 1.0)):
                    await self._wake.wait()
                return True
            except TimeoutError:
                continue
        return self._wake.is_set()

    def progressed(self) -> None:
        """Something moved: a read (also a failed one), a dispatch, an outcome committed or tried."""
        self.last_progress = time.monotonic()

    @property
    def work_waits(self) -> bool:
        """Messages in flight, a backlog to read, or a read cycle under way: a stall would be noticed."""
        return self._cycling or bool(self.inflight) or self.backlog

    async def read_until_short(self) -> int:
        """Read batches until one comes back short; return how many messages were taken."""
        taken = 0
        while not self.stopping:
            room = min(self._s.batch_size, self._s.prefetch - len(self.inflight))
            if room <= 0:
                self.backlog = True
                self._room.clear()
                await self._read_high()  # restores do not wait for room: they go first in their lanes
                self._wake.clear()
                await _first(self._room.wait(), self._wake.wait())  # room, or a new message (notify)
                continue
            read_at = time.monotonic()
            try:
                async with self._pool.acquire() as conn:
                    rows = await conn.fetch(self._q.read, self._q.queue, self._s.visibility_timeout, room,
                                            self._s.max_message_bytes)
            except DB_ERRORS as exc:
                self.progressed()  # the database is down, not the agent
                if self.db_error is None:
                    log.warning("read failed: %s", exc, extra={"action": "read_failed"})
                self.db_error = str(exc) or type(exc).__name__
                self.wake_later(min(5.0, self._live().poll_interval), "retry")
                return taken
            self.progressed()
            self.db_error = None
            taken += len(rows)
            self.backlog = len(rows) >= room
            if rows:
                await self._dispatch(rows, read_at)
            if len(rows) < room:
                return taken
        return taken

    async def _read_high(self) -> None:
        """While AGENT_PREFETCH messages are held: read the visible high-priority ones anyway, up to
        AGENT_BATCH_SIZE beyond what the agent may hold otherwise (AGENT_PREFETCH, and the takes
        filled by `top_up`). A month-end burst fills the prefetch; a restore then waited for a take
        to end before it was even read, and only then could its lane serve it first."""
        bound = self._s.prefetch + self._s.concurrency * self._s.coalesce + self._s.batch_size
        room = min(self._s.batch_size, bound - len(self.inflight))
        if room <= 0 or self.stopping:
            return
        read_at = time.monotonic()
        try:
            async with self._pool.acquire() as conn:
                rows = await conn.fetch(self._q.read_high, self._s.visibility_timeout, room, self._s.max_message_bytes)
        except DB_ERRORS as exc:  # the reads in order bring them once there is room
            log.debug("high-priority read failed: %s", exc, extra={"action": "read_failed"})
            return
        self.progressed()
        if rows:
            await self._dispatch(rows, read_at)

    async def top_up(self, device: str, room: int) -> None:
        """Device-fair reading: a device's lane is about to be served while a backlog waits in the
        queue. Read up to `room` more of that device's messages now, so its take is full: reading in
        queue order alone spreads AGENT_PREFETCH over every device of a burst, and each take would be
        a few commands (each take costs two device reads). Nothing is read while no backlog waits, so
        an isolated command pays nothing. At most AGENT_CONCURRENCY x AGENT_COALESCE messages are
        held beyond AGENT_PREFETCH this way. The lanes that ask while a top-up read is under way are
        topped up together by the next one (`read_devices`, up to TOP_UP_DEVICES of them): a
        month-end burst's two hundred lanes asked one statement each, most of its statements."""
        if not self.backlog or self.stopping or room <= 0:
            return
        asked = self._wanted.get(device)
        if asked is None:
            asked = self._wanted[device] = (room, asyncio.get_running_loop().create_future())
        elif room > asked[0]:
            asked = self._wanted[device] = (room, asked[1])
        if self._topping is None or self._topping.done():
            self._topping = asyncio.create_task(self._top_up_all(), name="top-up")
        await asyncio.shield(asked[1])  # a lane cancelled meanwhile does not cancel the others' read

    async def _top_up_all(self) -> None:
        """Reads for the lanes waiting, the longest waiting first, TOP_UP_DEVICES at most in each
        (the first lanes of a burst start while the next are read), until none waits. A failed read
        (or a bug) leaves its lanes to serve what they hold: the reads in queue order bring the rest later."""
        try:
            while self._wanted:
                devices = list(itertools.islice(self._wanted, TOP_UP_DEVICES))  # in the order they asked
                taking = {d: self._wanted.pop(d) for d in devices}
                try:
                    await self._read_devices({d: room for d, (room, _) in taking.items()})
                except Exception:
                    log.exception("device top-up failed", extra={"action": "read_failed"})
                finally:
                    for _, done in taking.values():
                        if not done.done():
                            done.set_result(None)
        finally:  # cancelled (the agent stopping): no lane waits for a read that will not come
            for _, done in self._wanted.values():
                if not done.done():
                    done.set_result(None)
            self._wanted.clear()

    async def _read_devices(self, wanted: dict[str, int]) -> None:
        if self.stopping:
            return
        devices = sorted(wanted)  # two agents topping up the same devices lock their rows in one order
        read_at = time.monotonic()
        try:
            async with self._pool.acquire() as conn:
                rows = await conn.fetch(self._q.read_devices, self._s.visibility_timeout, devices,
                                        as_text(wanted[d] for d in devices), self._s.max_message_bytes)
        except DB_ERRORS as exc:  # the reads in queue order bring them later
            log.debug("top-up read of %d device(s) failed: %s", len(devices), exc, extra={"action": "read_failed"})
            return
        self.progressed()
        if rows:
            await self._dispatch(rows, read_at)

    async def _wake_when_next_visible(self) -> None:
        """Delayed sends, retries and expired leases get no notification: wake when the next one is
        due, or at once for one that became visible since the last read."""
        try:
            async with self._pool.acquire() as conn:
                wait = await conn.fetchval(self._q.next_visible, as_text(self.inflight))
        except DB_ERRORS:
            return
        if wait is not None and wait.total_seconds() < self._live().poll_interval:
            # one already visible is read at once; the floor keeps a message another reader holds
            # locked (pgmq.read skips it) from making a busy loop
            self.wake_later(max(MIN_REREAD, wait.total_seconds() + 0.01), "delayed")

    async def _dispatch(self, rows: list[asyncpg.Record], read_at: float) -> None:
        deliveries = [delivery(r, time.time()) for r in rows]
        if self.on_read is not None:
            self.on_read(deliveries)
        parsed: list[tuple[Delivery, LaneWork, Any]] = []  # (delivery, its kind, its body)
        for d, r in zip(deliveries, rows):
            self.inflight[d.msg_id] = d  # a redelivery replaces an older delivery still in a lane
            try:
                admit(r, self._s.max_message_bytes)
                kind = self._work.recognise(d.raw)
                parsed.append((d, kind, kind.parse(d, d.raw)))
            except PermanentError as exc:
                self._executor.reject(d, str(exc))
        parsed.sort(key=lambda p: not p[1].overtakes)  # commands join their lanes first: they overtake the rest
        elsewhere: dict[str, Elsewhere] = {}
        if unknown := sorted({body.device for _, _, body in parsed if self._inventory.get(body.device) is None
                              and body.device not in self._inventory.broken}):
            try:
                elsewhere = await self._inventory.look_up(unknown)
            except DB_ERRORS as exc:  # cannot tell unknown from new: try these again shortly
                log.warning("inventory look-up failed: %s", exc, extra={"action": "inventory_failed"})
                for d, _, body in parsed:
                    if body.device in unknown:
                        self._executor.postpone(d, body.device, "inventory look-up failed")
                parsed = [(d, kind, body) for d, kind, body in parsed if body.device not in unknown]
        for d, kind, body in parsed:
            device = self._inventory.get(body.device)
            where = elsewhere.get(body.device)
            if device is not None:
                self._executor.submit(kind.item(d, body, device))
            elif where is not None and kind.reroutes:
                self._reroute(d, kind, body, where)
            else:  # a reconcile run of this site does not check another site's device: its own runs do
                why = (f"device {body.device!r} belongs to site {where.site!r} now" if where is not None
                       else self._inventory.why_unknown(body.device))
                self._executor.settle(kind.unknown_device(d, body, why))
        self.progressed()

    def _reroute(self, d: Delivery, kind: LaneWork, body: Any, where: Elsewhere) -> None:
        """A message for another site's device: moved to that site's queue once, else what its kind
        does with a device it cannot work on (a command is dead-lettered with the reason)."""
        decision = route(d, self._q.queue, self._s.site, where)
        if isinstance(decision, str):
            self._executor.settle(kind.unknown_device(d, body, decision))
            return
        log.info("moved to queue %s: device %s belongs to site %s", decision.to, body.device, where.site,
                 extra={"action": "rerouted", "msg_id": d.msg_id, "device": body.device, "service": body.service,
                        "site": where.site, "queue": decision.to})
        self._executor.settle(moved(d, body, decision, self._q.queue, where.site))

    # -- bookkeeping ----------------------------------------------------------------------

    def figures(self) -> ConsumerFigures:
        return ConsumerFigures(len(self.inflight), dict(self.wakeups), self.db_error, self.last_progress,
                               self.work_waits, self.last_cycle_wall, self.last_cycle_ms)

    def committed(self, outcomes: list[Outcome], lost: set[int]) -> None:
        """Reporter callback: these messages are settled (or given up: `lost`); free their room.
        Only the delivery that was settled leaves: a newer delivery of the same message stays."""
        soonest = None
        for o in outcomes:
            current = self.inflight.get(o.delivery.msg_id)
            if current is not None and current.read_ct == o.delivery.read_ct:
                del self.inflight[o.delivery.msg_id]
            if o.delivery.msg_id in lost:
                continue
            self.outcomes[o.finish] += 1
            if o.finish in ("retry", "park"):
                soonest = o.retry_delay if soonest is None else min(soonest, o.retry_delay)
        if soonest is not None:
            self.wake_later(soonest + 0.05, "retry")
        self.progressed()
        self._room.set()

    async def keep_leases(self) -> None:
        """Extend the visibility of everything in flight every third of the timeout."""
        period = self._s.visibility_timeout / 3
        while True:
            await asyncio.sleep(period)
            if not self.inflight:
                continue
            try:  # never between a commit and its callback: a settled retry delay would be overwritten
                async with self._settling.alone(), self._pool.acquire() as conn:
                    held = list(self.inflight.values())
                    await conn.execute(self._q.extend_leases, as_text(d.msg_id for d in held),
                                       as_text(d.read_ct for d in held), self._s.visibility_timeout)
            except DB_ERRORS as exc:
                log.warning("lease extension failed: %s", exc, extra={"action": "lease_failed"})

    async def release_unfinished(self) -> int:
        """Make what is still in flight visible again at once, for the next reader."""
        pending = list(self.inflight.values())
        if not pending:
            return 0
        async with self._pool.acquire() as conn:
            await conn.execute(self._q.release, as_text(d.msg_id for d in pending), as_text(d.read_ct for d in pending))
        log.info("released %d unfinished messages", len(pending), extra={"action": "released"})
        self.inflight.clear()
        return len(pending)

    def stop(self) -> None:
        self.stopping = True
        self._wake.set()
        self._room.set()
        for timer in self._timers.values():
            timer.cancel()


async def _first(*aws: Awaitable[object]) -> None:
    """Wait until the first of these is done; cancel the others."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
