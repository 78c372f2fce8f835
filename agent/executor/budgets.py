"""The device budget at work: every device call (read, write, read-back, probe; commands and
reconciliation alike) goes through the budgeted driver, which spaces it (`max_rate`) and feeds its
outcome to the device's breaker. An open breaker parks the device's work through the executor's
gate (`gate`), as an unreachable tunnel does; when its cool-down ends one probe decides, and a
device that answers again has its parked work woken.

The budget is per agent: one agent operates a device at a time (device claims), so the device
sees at most `max_rate` operations a second from that agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from agent.drivers.base import AppliesMany, CanReadMany, ChecksPolicy, Driver, ReadsMany
from agent.errors import AgentError, NoAnswerError, TransientError, UnreachableError
from agent.executor.budget import OPEN, Breaker, TokenBucket, breaker_options, max_rate
from agent.executor.deadlines import Deadlines
from agent.model.device import Device
from agent.text import rfc3339

log = logging.getLogger("agent.budget")


class BreakerOpen(TransientError):
    """The device's breaker is open: the call was not made (the gate parks the work)."""

    kind = "breaker_open"


@dataclass(frozen=True)
class BudgetFigures:
    """What the device budgets tell the housekeeper (/status) and the metrics."""

    devices: tuple[dict[str, Any], ...]           # per device with a max_rate or a breaker not closed
    breakers: Mapping[str, tuple[bool, int]]      # device -> (open, trips), every device that ever timed out
    rate_waits: Mapping[str, tuple[int, float]]   # device -> (waits, seconds waited) for its max_rate


class DeviceBudgets:
    def __init__(self, deadlines: Deadlines, timeout: Callable[[Device], float],
                 devices: Callable[[], dict[str, Device]], on_closed: Callable[[list[str]], Awaitable[None]],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._deadlines = deadlines
        self._timeout = timeout            # one device call's deadline
        self._devices = devices            # the inventory, by id
        self._on_closed = on_closed        # the devices answer again: wake their parked work
        self._clock = clock
        self._buckets: dict[str, TokenBucket] = {}
        self.breakers: dict[str, Breaker] = {}
        self.waits: dict[str, list[float]] = {}  # device -> [rate-limit waits, seconds waited]
        self._kick = asyncio.Event()
        self._probes: set[asyncio.Task[None]] = set()
        self._drivers: dict[str, Driver] = {}   # driver name -> the unwrapped driver, for the probe

    def wrap(self, driver: Driver) -> Driver:
        self._drivers[driver.name] = driver
        return budgeted(driver, self)  # type: ignore[return-value]

    # -- the executor's gate --------------------------------------------------------------

    def gate(self, device: Device) -> str | None:
        """A reason to park this device's work (its breaker is not closed), or None."""
        b = self.breakers.get(device.id)
        if b is None or b.closed:
            return None
        return f"breaker_open: {b.timeouts} timeouts in a row, retry after {self._wall(b.until)}"

    # -- every device call ----------------------------------------------------------------

    async def call(self, device: Device, op: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        b = self.breakers.get(device.id)
        if b is not None and not b.closed:
            raise BreakerOpen(f"{device.id}: not asked: {self.gate(device)}")
        await self._pace(device)
        return await self._watch(device, op(*args))

    async def _pace(self, device: Device) -> None:
        rate = max_rate(device)
        if rate is None:
            if self._buckets:
                self._buckets.pop(device.id, None)
            return
        bucket = self._buckets.get(device.id)
        if bucket is None or bucket.rate != rate:
            bucket = self._buckets[device.id] = TokenBucket(rate)
        wait = bucket.reserve(self._clock())
        if wait > 0:
            self._deadlines.extend(wait)  # the wait is not the device's time
            counts = self.waits.setdefault(device.id, [0, 0.0])
            counts[0] += 1
            counts[1] += wait
            await asyncio.sleep(wait)
            bucket.started(self._clock())

    async def _watch(self, device: Device, call: Awaitable[Any]) -> Any:
        try:
            result = await call
        except asyncio.CancelledError:
            if self._deadlines.expired():
                self._timed_out(device)
            raise
        except UnreachableError:  # refused, no route: the host answered (the VPN guard judges routes)
            self._answered(device)
            raise
        except (TimeoutError, NoAnswerError):
            self._timed_out(device)
            raise
        except Exception:
            self._answered(device)  # an error is an answer: the device is there
            raise
        self._answered(device)
        return result

    def _timed_out(self, device: Device) -> None:
        b = self.breakers.get(device.id)
        if b is None:
            b = self.breakers[device.id] = Breaker()
        b.trip_after, b.cooldown = breaker_options(device)
        if b.timed_out(self._clock()):
            log.warning("%s: breaker open after %d timeouts in a row: its work parks until %s", device.id,
                        b.timeouts, self._wall(b.until), extra={"action": "breaker_open", "device": device.id})
            self._kick.set()

    def _answered(self, device: Device) -> None:
        b = self.breakers.get(device.id)
        if b is not None and b.answered():
            log.info("%s answers again: breaker closed, its parked work goes now", device.id,
                     extra={"action": "breaker_closed", "device": device.id})
            self._spawn(self._on_closed([device.id]))

    # -- cool-down and probe --------------------------------------------------------------

    def reachable(self, device_ids: list[str]) -> None:
        """The VPN guard sees these devices reachable again after an outage: the timeouts they had
        were the tunnel's, not theirs. A closed breaker forgets them; an open one probes now."""
        for device_id in device_ids:
            b = self.breakers.get(device_id)
            if b is None:
                continue
            if b.closed:
                b.timeouts = 0
            elif b.state == OPEN:
                b.until = self._clock()
                self._kick.set()

    async def run(self) -> None:
        """Probe each device whose breaker's cool-down is over."""
        try:
            while True:
                now = self._clock()
                for device_id, b in list(self.breakers.items()):
                    if b.due(now):
                        b.probing()
                        self._spawn(self._probe(device_id, b))
                ends = [b.until for b in self.breakers.values() if b.state == OPEN]
                self._kick.clear()
                with contextlib.suppress(TimeoutError):  # asyncio.timeout: see agent/reconcile/reconciler.py
                    async with asyncio.timeout(max(0.0, min(ends) - now) + 0.01 if ends else None):
                        await self._kick.wait()
        finally:
            for task in list(self._probes):
                task.cancel()

    async def _probe(self, device_id: str, b: Breaker) -> None:
        dev = self._devices().get(device_id)
        driver = self._drivers.get(dev.driver) if dev is not None else None
        if dev is None or driver is None:  # removed meanwhile: nothing to protect
            self.breakers.pop(device_id, None)
            return
        try:
            await self._pace(dev)
            with self._deadlines.limit(self._timeout(dev)):
                await self._watch(dev, driver.probe(dev))
        except (AgentError, TimeoutError):
            pass  # _watch judged it
        except Exception:  # a driver bug answers nothing: _watch counted it as an answer
            log.exception("%s: the breaker's probe failed", device_id, extra={"action": "internal_error"})
        if b.state == OPEN:
            log.warning("%s: no answer to the breaker's probe: its work parks until %s", device_id,
                        self._wall(b.until), extra={"action": "breaker_open", "device": device_id})

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._probes.add(task)
        task.add_done_callback(self._probes.discard)

    def _wall(self, at: float) -> str:
        return rfc3339(time.time() + at - self._clock())

    # -- figures --------------------------------------------------------------------------

    def figures(self) -> BudgetFigures:
        return BudgetFigures(tuple(self._devices_shown()),
                             {d: (not b.closed, b.trips) for d, b in self.breakers.items()},
                             {d: (int(n), seconds) for d, (n, seconds) in self.waits.items()})

    def _devices_shown(self) -> list[dict[str, Any]]:
        """Per device with a rate limit or a breaker that is not closed: what /status shows."""
        out = []
        devices = self._devices()
        for device_id in sorted(set(self.waits) | {d for d, b in self.breakers.items() if not b.closed}
                                | {d for d, dev in devices.items() if max_rate(dev) is not None}):
            b = self.breakers.get(device_id)
            dev = devices.get(device_id)
            waits, waited = self.waits.get(device_id, (0, 0.0))
            out.append({"device": device_id, "max_rate": max_rate(dev) if dev else None,
                        "rate_waits": int(waits), "rate_wait_s": round(waited, 3),
                        "breaker": b.state if b else "closed", "timeouts": b.timeouts if b else 0,
                        "trips": b.trips if b else 0,
                        "retry_after": self._wall(b.until) if b and not b.closed else None})
        return out


class Budgeted:
    """A driver whose device calls go through the device budget. It has exactly the optional
    capabilities of the driver it wraps (`budgeted` picks them), no more: a driver without
    `read_many` is not read as if it had one."""

    def __init__(self, inner: Driver, budgets: DeviceBudgets) -> None:
        self.inner = inner
        self.name = inner.name
        self._budgets = budgets

    def validate_options(self, device: Device) -> None:
        self.inner.validate_options(device)

    async def read(self, device: Device, service: str) -> Any:
        return await self._budgets.call(device, self.inner.read, device, service)

    async def apply(self, device: Device, service: str, state: Any) -> None:
        await self._budgets.call(device, self.inner.apply, device, service, state)

    async def probe(self, device: Device) -> str | None:
        return await self._budgets.call(device, self.inner.probe, device)  # type: ignore[no-any-return]

    async def close(self) -> None:
        await self.inner.close()


class _ReadsMany(Budgeted):
    inner: Any

    async def read_many(self, device: Device, services: list[str]) -> Any:  # one call for many: one operation
        return await self._budgets.call(device, self.inner.read_many, device, services)


class _CanReadMany(Budgeted):
    inner: Any

    def can_read_many(self, device: Device) -> bool:
        return bool(self.inner.can_read_many(device))


class _AppliesMany(Budgeted):
    inner: Any

    async def apply_many(self, device: Device, wanted: Mapping[str, Any]) -> Any:  # one call for many: one operation
        return await self._budgets.call(device, self.inner.apply_many, device, wanted)


class _ChecksPolicy(Budgeted):
    inner: Any

    async def check_policy(self, device: Device, services: Iterable[str]) -> list[str]:  # its own bounds, unpaced
        return await self.inner.check_policy(device, services)  # type: ignore[no-any-return]


_CAPABILITIES: tuple[tuple[type, type[Budgeted]], ...] = (
    (ReadsMany, _ReadsMany), (CanReadMany, _CanReadMany), (AppliesMany, _AppliesMany), (ChecksPolicy, _ChecksPolicy))
_KINDS: dict[tuple[type[Budgeted], ...], type[Budgeted]] = {}


def budgeted(driver: Driver, budgets: DeviceBudgets) -> Budgeted:
    """`driver` through the device budget, with the optional capabilities it has and no others."""
    has = tuple(kind for protocol, kind in _CAPABILITIES if isinstance(driver, protocol))
    if (cls := _KINDS.get(has)) is None:
        cls = _KINDS[has] = type("Budgeted", (*has, Budgeted), {}) if has else Budgeted
    return cls(driver, budgets)
