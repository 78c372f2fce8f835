"""The device inventory of this agent's site, cached in memory and reloaded on change.

A trigger on agent.devices NOTIFYs `agent_inventory`; the listener calls `changed()`, and the
listener's every (re)connect reloads too, so a running daemon sees edits at once. Any role may send
that NOTIFY, as often as it likes: reloads are debounced to one per RELOAD_EVERY seconds, and a change
notified during a reload or its window gets one more reload after it, so none is missed. The first load
also checks that this agent's queue is its site's (agent.sites): a wrong pairing refuses to start.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import replace

import asyncpg

from agent.db.connect import DB_ERRORS, reason
from agent.db.queries import Queries
from agent.drivers.base import Driver
from agent.drivers.registry import Drivers
from agent.errors import AgentError, ConfigError
from agent.executor import budget
from agent.inventory.debounce import Debounced
from agent.model.device import Device
from agent.model.sites import Elsewhere

log = logging.getLogger("agent.inventory.cache")
RELOAD_EVERY = 1.0  # seconds: a full reload of a site of thousands of devices costs tens of ms


def device_from_row(row: asyncpg.Record) -> Device:
    return Device(id=row["id"], driver=row["driver"], address=row["address"], site=row["site"],
                  options=json.loads(row["options"]), credential=row["credential"],
                  paused=row["paused"] if "paused" in row.keys() else None)


# device options the executor reads (agent/executor/budget.py: the device budget); drivers never see them validated
AGENT_OPTIONS = {"max_parallel", "max_rate", "trip_after", "trip_cooldown"}


def check_agent_options(dev: Device) -> None:
    value = dev.options.get("max_parallel", 1)
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 64:
        raise ConfigError("max_parallel must be an integer from 1 to 64 (writes the device takes at once)")
    if wrong := budget.check_options(dev.options):
        raise ConfigError(wrong)


def validate_with(driver: Driver, dev: Device) -> None:
    """The device's options: the agent's own (max_parallel, the budget) checked here, the rest by its driver."""
    check_agent_options(dev)
    driver.validate_options(replace(dev, options={k: v for k, v in dev.options.items() if k not in AGENT_OPTIONS}))


class Inventory:
    def __init__(self, pool: asyncpg.Pool, queries: Queries, site: str, drivers: Drivers,
                 reload_every: float = RELOAD_EVERY) -> None:
        self._pool = pool
        self._q = queries
        self._site = site
        self._drivers = drivers
        self.devices: dict[str, Device] = {}
        self.broken: dict[str, str] = {}  # device id -> why its options cannot work
        self._loaded_at = 0.0
        self._reloads = Debounced(self._load_quietly, reload_every)
        self._lock = asyncio.Lock()

    def get(self, device_id: str) -> Device | None:
        return self.devices.get(device_id)

    async def load(self) -> None:
        async with self._lock:
            async with self._pool.acquire() as conn:
                rows = await conn.fetch(self._q.load_devices, self._site)
            devices, broken = self._check(rows)
            added = devices.keys() - self.devices.keys()
            removed = self.devices.keys() - devices.keys()
            self.devices, self.broken, self._loaded_at = devices, broken, time.monotonic()
        if added or removed or broken:
            log.info("inventory loaded: %d devices (%d added, %d removed, %d misconfigured)",
                     len(devices), len(added), len(removed), len(broken),
                     extra={"action": "inventory_loaded", "site": self._site})
        for why in broken.values():
            log.error(why, extra={"action": "device_misconfigured"})

    def changed(self) -> None:
        """A NOTIFY said the table changed: reload now, or at the end of this reload's window."""
        self._reloads.poke()

    async def look_up(self, device_ids: list[str]) -> dict[str, Elsewhere]:
        """Devices a message named that the cache does not hold: they may have been added just
        before the command was sent, or belong to another site. One indexed query for just these
        ids, never a full reload, so a stream of commands for unknown devices costs little. Returns
        those of other sites, with their site's queue. Raises on database errors."""
        async with self._lock:
            async with self._pool.acquire() as conn:
                rows = await conn.fetch(self._q.load_some_devices, device_ids)
            devices, broken = self._check([r for r in rows if r["site"] == self._site])
            self.devices = {**self.devices, **devices}
            self.broken = {**self.broken, **broken}
        return {r["id"]: Elsewhere(r["id"], r["site"], r["site_queue"], r["queue_ready"])
                for r in rows if r["site"] != self._site}

    def _check(self, rows: list[asyncpg.Record]) -> tuple[dict[str, Device], dict[str, str]]:
        devices, broken = {}, {}
        for row in rows:
            dev = device_from_row(row)
            try:
                validate_with(self._drivers.get(dev.driver), dev)
            except AgentError as exc:
                broken[dev.id] = f"device {dev.id!r} is misconfigured: {exc}"
                continue
            devices[dev.id] = dev
        return devices, broken

    async def _load_quietly(self) -> None:
        try:
            await self.load()
        except DB_ERRORS as exc:
            log.warning("inventory reload failed: %s", reason(exc), extra={"action": "inventory_failed"})

    def why_unknown(self, device_id: str) -> str:
        return self.broken.get(device_id) or (
            f"unknown device {device_id!r}: not in the inventory of site {self._site!r}")
