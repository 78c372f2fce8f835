"""Device claims: two agents never operate one device at once.

A lane (the queue of work for one device inside one agent) claims its device before it works
and releases it when it runs dry. A claim is a lease, a row in agent.device_claims with an
expiry, taken through the pool: another agent may take the device over only once the lease has
expired. The lease outlasts the longest operation this agent may start on the device, and an
operation is started only while the lease has at least that long to run, so "never two operations
on one device at once" holds also when this agent's connection dies mid-operation or Postgres
restarts: the row is still there, and by the time it expires the operation has surely ended.

Claims, renewals and releases from all lanes are coalesced, one statement per flush; held leases
are renewed every RENEW seconds in one statement. A lane that runs dry lets go LINGER seconds later,
so a device commanded again soon after (the usual pattern of a customer's changes) starts at once
instead of waiting for a claim round trip. A device claimed elsewhere is not waited for:
its work goes back to the queue for a moment (a bounce, not an attempt). A stopping agent releases
its devices at once; a killed agent's devices are free once its leases expire, or at once for an
agent on the same host whose process is gone (the usual restart by systemd or a container runtime).
Leases are held by the process (its instance, agent/db/identity.py), not by the agent id: two processes
started with one AGENT_AGENT_ID never hold one device together.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import time
from typing import Any

import asyncpg

from agent.db.connect import DB_ERRORS
from agent.db.identity import alive, host_identity, new_instance
from agent.db.queries import Queries, as_text

log = logging.getLogger("agent.claims")

RENEW = 5.0      # seconds between renewals of held leases
LINGER = 1.0     # a lane that ran dry keeps its claim this long: the next command skips a round trip
SLACK = 3 * RENEW  # a lease outlasts the operation bound by this much: renewals may fail twice


class DeviceClaims:
    def __init__(self, pool: asyncpg.Pool, queries: Queries, agent_id: str,
                 host: str | None = None, pid: int | None = None, instance: str | None = None) -> None:
        self._pool = pool
        self._q = queries
        self._agent_id = agent_id
        self._instance = instance or new_instance()
        self._host = host or host_identity()
        self._pid = pid or os.getpid()
        self._dead: set[str] = set()              # instances on this host whose process is gone
        self._ttl: dict[str, float] = {}          # held device -> lease length asked for
        self._until: dict[str, float] = {}        # held device -> monotonic time its lease surely runs to
        self._claims: list[tuple[str, float, asyncio.Future[bool]]] = []
        self._releases: list[str] = []
        self._lingering: dict[str, float] = {}    # released by its lane -> monotonic time to let go
        self._wake = asyncio.Event()

    def fresh(self, device: str, need: float) -> bool:
        """True while this agent holds the device with at least `need` seconds of lease left."""
        return self._until.get(device, 0.0) - time.monotonic() >= need

    async def claim(self, device: str, need: float) -> bool:
        """True when this agent may start an operation of up to `need` seconds on the device."""
        self._lingering.pop(device, None)
        if self.fresh(device, need):
            return True
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._claims.append((device, need + SLACK, fut))
        self._wake.set()
        return await fut

    def release(self, device: str) -> None:
        """The lane ran dry: let go of the device after LINGER seconds, unless claimed again."""
        if device in self._ttl:
            self._lingering[device] = time.monotonic() + LINGER
            self._wake.set()

    def _let_go(self, now: float) -> None:
        for device, at in list(self._lingering.items()):
            if at <= now:
                del self._lingering[device]
                self._ttl.pop(device, None)
                self._until.pop(device, None)
                self._releases.append(device)

    @property
    def held(self) -> int:
        return len(self._ttl)

    async def run(self) -> None:
        try:
            renew_at = time.monotonic() + RENEW
            while True:
                now = time.monotonic()
                if now >= renew_at:
                    renew_at = now + RENEW
                    await self._renew()
                    continue
                wake = min([renew_at, *self._lingering.values()]) - now
                with contextlib.suppress(TimeoutError):  # asyncio.timeout: see agent/reconcile/reconciler.py
                    async with asyncio.timeout(max(0.0, wake)):
                        await self._wake.wait()
                self._wake.clear()
                self._let_go(time.monotonic())
                claims, self._claims = self._claims, []
                releases, self._releases = self._releases, []
                if claims or releases:
                    await self._flush(claims, releases)
        finally:
            for _device, _ttl, fut in self._claims:
                if not fut.done():
                    fut.set_result(False)
            await self._release_all()

    async def _flush(self, claims: list[tuple[str, float, asyncio.Future[bool]]], releases: list[str]) -> None:
        wanted: dict[str, float] = {}
        for device, ttl, _fut in claims:
            wanted[device] = max(ttl, wanted.get(device, 0.0))
        releases = [d for d in dict.fromkeys(releases) if d not in wanted]  # claimed again meanwhile: keep it
        sent = time.monotonic()
        try:
            async with self._pool.acquire() as conn:
                row = await conn.fetchrow(self._q.claim_devices, self._agent_id, list(wanted),
                                          as_text(wanted.values()), releases, self._host, self._pid,
                                          sorted(self._dead), self._instance, timeout=10)
        except DB_ERRORS as exc:
            log.warning("device claims failed (%s): work will be tried again shortly", exc,
                        extra={"action": "claims_failed"})
            for _device, _ttl, fut in claims:
                if not fut.done():
                    fut.set_result(False)
            await asyncio.sleep(random.uniform(0.2, 0.5))
            return
        got = set(row["claimed"])
        if retry := self._dead_holders(json.loads(row["holders"]), got):
            log.info("taking over %d device(s) from agents of this host that are gone", len(retry),
                     extra={"action": "claims_taken_over"})
            self._claims.extend((d, ttl, fut) for d, ttl, fut in claims if d in retry)
            self._wake.set()
            claims = [c for c in claims if c[0] not in retry]
        for device, ttl in wanted.items():
            if device in got:
                self._ttl[device] = ttl
                self._until[device] = sent + ttl
        for device, ttl, fut in claims:
            ok = device in got and self.fresh(device, ttl - SLACK)
            if not fut.done():
                fut.set_result(ok)

    def _dead_holders(self, holders: list[dict[str, Any]], got: set[str]) -> set[str]:
        """Devices held by a process of this host that no longer exists (or by an earlier instance
        of this one): claim them again. A lease without an instance (an agent before schema 8) runs out."""
        retry = set()
        for h in holders:
            instance = h.get("instance")
            if h["device"] in got or not instance or instance in self._dead or h.get("host") != self._host:
                continue
            if h.get("pid") == self._pid or not alive(h.get("pid")):
                self._dead.add(instance)
                retry.add(h["device"])
        return retry

    async def _renew(self) -> None:
        if not self._ttl:
            return
        devices = list(self._ttl)
        sent = time.monotonic()
        try:
            async with self._pool.acquire() as conn:
                rows = await conn.fetch(self._q.renew_claims, self._agent_id, devices,
                                        as_text(self._ttl[d] for d in devices), self._instance, timeout=RENEW)
            kept = {r["device"] for r in rows}
        except DB_ERRORS as exc:  # the leases run on; work stops starting once they run short
            log.warning("device claims could not be renewed: %s", exc, extra={"action": "claims_failed"})
            return
        for device in devices:
            if device not in self._ttl:
                continue  # released meanwhile
            if device in kept:
                self._until[device] = sent + self._ttl[device]
            else:
                log.warning("device claim lost: %s", device, extra={"action": "claims_lost", "device": device})
                self._ttl.pop(device, None)
                self._until.pop(device, None)

    async def _release_all(self) -> None:
        self._lingering.clear()
        self._ttl.clear()
        self._until.clear()
        try:
            async with self._pool.acquire() as conn:
                await conn.execute(self._q.release_all_claims, self._agent_id, self._instance, timeout=5)
        except (*DB_ERRORS, asyncio.CancelledError):  # they expire by themselves
            pass
