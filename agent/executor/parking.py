"""Parked work, by device, so that it can be woken the moment its device is reachable again
instead of at the end of its backoff."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

import asyncpg

from agent.db.queries import Queries, as_text
from agent.model.outcome import Delivery, Outcome

log = logging.getLogger("agent.parking")


class Parking:
    def __init__(self, pool: asyncpg.Pool, queries: Queries) -> None:
        self._pool = pool
        self._q = queries
        self._by_device: dict[str, dict[int, int]] = {}  # device -> {msg_id: read_ct}
        self._woken: dict[str, float] = {}                # device -> when it was last woken

    def committed(self, outcomes: Iterable[Outcome]) -> list[str]:
        """Note parked messages; return devices woken while one of them was being parked again."""
        late = set()
        for o in outcomes:
            if o.finish == "park" and o.device and not o.bounce:
                self._by_device.setdefault(o.device, {})[o.delivery.msg_id] = o.delivery.read_ct
                if self._woken.get(o.device, 0.0) > o.delivery.received:
                    late.add(o.device)
        return sorted(late)

    def read(self, deliveries: Iterable[Delivery]) -> None:
        for d in deliveries:
            for msgs in self._by_device.values():
                msgs.pop(d.msg_id, None)

    @property
    def count(self) -> int:
        return sum(len(m) for m in self._by_device.values())

    def devices(self) -> list[str]:
        return [d for d, m in self._by_device.items() if m]

    async def wake(self, devices: Iterable[str]) -> int:
        """Make the parked messages of these devices visible now; return how many."""
        ids, rcs = [], []
        now = time.monotonic()
        for device in devices:
            self._woken[device] = now
            for msg_id, read_ct in self._by_device.pop(device, {}).items():
                ids.append(msg_id)
                rcs.append(read_ct)
        if not ids:
            return 0
        async with self._pool.acquire() as conn:
            await conn.execute(self._q.release, as_text(ids), as_text(rcs))
        log.info("woke %d parked message(s)", len(ids), extra={"action": "unparked"})
        return len(ids)
