"""The VPN guard: keeps a current picture of the tunnel, answers "may this device be worked on
now?", records reachability in Postgres, and wakes parked work the moment a device is reachable.

With AGENT_REQUIRE_VPN=true every device that has a network address must be reached through the
WireGuard interface; with false, devices whose route does not use the tunnel count as directly
attached. Devices without an address (the `sim` driver) never need the tunnel.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import asyncpg

from agent.db.connect import DB_ERRORS
from agent.errors import AgentError
from agent.model.device import Device
from agent.vpn.health import GateVerdict, PeerVerdict, VpnSnapshot, gate, peer_for
from agent.vpn.monitor import VpnMonitor
from agent.vpn.resolve import HostResolver, address_host

log = logging.getLogger("agent.vpn")

REMEDY = ("run agentd inside the VPN's network namespace: in docker compose give it "
          'network_mode: "service:wireguard"; under systemd use NetworkNamespacePath= or run it on the gateway; '
          "for devices on a directly attached network set AGENT_REQUIRE_VPN=false")


UNPROVEN_WAIT = 25.0
NOT_ANSWERING = "device_not_answering"


@dataclass(frozen=True)
class Reach:
    reachable: bool
    reason: str
    peer: str | None
    since: float


@dataclass(frozen=True)
class VpnFigures:
    """What the guard tells the housekeeper and the metrics: the tunnel as last sampled."""

    required: bool                  # AGENT_REQUIRE_VPN, and a device has a network address
    error: str | None               # why the tunnel cannot carry the devices' traffic, if it cannot
    peers: tuple[PeerVerdict, ...]
    reach: Mapping[str, Reach]      # device -> reachable or not, why, since when


def start_problem(snap: VpnSnapshot, hosts: dict[str, str]) -> str | None:
    """Why this namespace cannot reach any device through WireGuard, or None (pure). Only the
    absence of a WireGuard interface holds the agent back: a device whose own route leaves by
    another interface is parked (`route_not_via_tunnel`) while the others are worked on."""
    if not hosts or snap.interface is not None:
        return None
    return snap.problem or "no WireGuard interface"


class VpnGuard:
    def __init__(self, required: bool, interface: str | None, stale_after: float, interval: float,
                 devices: Callable[[], list[Device]], pool: asyncpg.Pool, agent_id: str,
                 on_reachable: Callable[[list[str]], Awaitable[None]],
                 probe: Callable[[Device], Awaitable[None]] | None = None, probe_interval: float = 0.0) -> None:
        self.required = required
        self.monitor = VpnMonitor(interface, stale_after)
        self._interval = interval
        self._devices = devices
        self._pool = pool
        self._agent_id = agent_id
        self._on_reachable = on_reachable
        self.resolver = HostResolver(on_change=lambda: self._kick.set())
        self.reach: dict[str, Reach] = {}
        self._kick = asyncio.Event()
        self._sampling = asyncio.Lock()
        self._probe = probe
        self._probe_interval = probe_interval
        self.silent: dict[str, str] = {}  # device id -> why its probe failed (its tunnel is fine)
        self._paused: set[str] = set()     # devices paused at the last look

    def hosts(self) -> dict[str, str]:
        """device id -> IP, for the devices that have a network address."""
        out = {}
        for dev in self._devices():
            if host := self.resolver.cached(dev.address):
                out[dev.id] = host
        return out

    def verdict(self, device: Device, snap: VpnSnapshot | None = None) -> GateVerdict:
        snap = snap or self.monitor.last
        host = self.hosts().get(device.id) if device.address else None
        if host is None and (name := address_host(device.address)) is not None:  # a name not (yet) resolved
            return GateVerdict(False, f"unresolved: {name} does not resolve (yet); check its DNS name")
        if host is not None and not self.required and snap.routes.get(host) != snap.interface:
            return GateVerdict(True, "directly attached (AGENT_REQUIRE_VPN=false)")
        return gate(device, host, snap)

    def gate(self, device: Device) -> str | None:
        """The executor's question: a reason to park this device's work, or None. A device the
        operator paused (`agentctl device pause`) waits like an unreachable one: parked, no attempt used."""
        if device.paused is not None:
            return f"paused: {device.paused}"
        r = self.reach.get(device.id)
        if r is not None:  # a device that is down behind a healthy tunnel is not parked
            return None if r.reachable or r.reason.startswith(NOT_ANSWERING) else r.reason
        v = self.verdict(device)
        return None if v.reachable else v.reason

    def figures(self) -> VpnFigures:
        snap = self.monitor.last
        needed = bool(self.hosts())
        error = None
        if needed and self.required and snap.interface is None:
            error = snap.problem or "no WireGuard interface"
        elif needed and snap.interface is not None and not snap.interface_up:
            error = f"{snap.interface} is down"
        return VpnFigures(self.required and needed, error, tuple(snap.verdicts.values()), dict(self.reach))

    def device_failed(self, device: Device) -> None:
        self.monitor.device_failed(device.id, self.hosts().get(device.id))
        self._kick.set()

    async def check(self) -> VpnSnapshot:
        async with self._sampling:
            return await self._check()

    async def _check(self) -> VpnSnapshot:
        hosts = self.hosts()
        snap = await self.monitor.sample(sorted(set(hosts.values())))
        now, changed, back = time.time(), [], []
        for dev in self._devices():
            v = self.verdict(dev, snap)
            if v.reachable and dev.id in self.silent:
                v = GateVerdict(False, f"{NOT_ANSWERING}: {self.silent[dev.id]}", v.peer)
            old = self.reach.get(dev.id)
            if old is None or old.reachable != v.reachable or old.reason.split(":")[0] != v.reason.split(":")[0]:
                self.reach[dev.id] = Reach(v.reachable, v.reason, v.peer, now)
                changed.append(dev.id)
                if v.reachable and old is not None and not old.reachable:
                    back.append(dev.id)
                log.log(logging.INFO if v.reachable else logging.WARNING, "%s %s: %s", dev.id,
                        "reachable" if v.reachable else "unreachable", v.reason,
                        extra={"action": "reachable" if v.reachable else "unreachable", "device": dev.id})
        if changed:
            await self._record(changed)
        if back:
            await self._on_reachable(back)
        return snap

    async def confirm(self, device: Device, since: float) -> str | None:
        """Before the last attempt at a silent device is given up: did the tunnel carry anything from
        its peer since the attempt began (unix `since`)? None when it did (the device itself failed,
        an ordinary failure) or the device needs no tunnel; otherwise a reason to park the work.

        Waits for proof at most 2K + 3 s for a peer with persistent keepalive K, else
        UNPROVEN_WAIT s (a live peer answers the handshake WireGuard starts after ~15 s of silence).
        """
        host = self.hosts().get(device.id)
        if host is None:
            return None
        deadline: float | None = None
        while True:
            snap = await self.check()
            v = self.verdict(device, snap)
            if not v.reachable:
                return v.reason
            peer = peer_for(host, snap.peers) if snap.routes.get(host) == snap.interface else None
            if peer is None or self.monitor.heard_since(peer.public_key, since):
                return None
            if deadline is None:
                deadline = time.monotonic() + (2 * peer.keepalive + 3 if peer.keepalive else UNPROVEN_WAIT)
            if time.monotonic() >= deadline:
                return (f"tunnel_unproven: nothing heard from peer {peer.name} since the attempt began; "
                        "waiting for the tunnel before giving up")
            await asyncio.sleep(min(1.0, self._interval))

    async def _record(self, devices: list[str]) -> None:
        rows = [(d, self.reach[d].reachable, self.reach[d].reason, self.reach[d].peer) for d in devices]
        try:
            async with self._pool.acquire() as conn:
                await conn.executemany(
                    "INSERT INTO agent.reachability AS r (device, reachable, reason, peer, since, checked_at, agent_id)"
                    " VALUES ($1, $2, $3, $4, now(), now(), $5) ON CONFLICT (device) DO UPDATE SET"
                    " reachable = EXCLUDED.reachable, reason = EXCLUDED.reason, peer = EXCLUDED.peer,"
                    " since = CASE WHEN r.reachable = EXCLUDED.reachable THEN r.since ELSE now() END,"
                    " checked_at = now(), agent_id = EXCLUDED.agent_id",
                    [(*row, self._agent_id) for row in rows])
        except DB_ERRORS as exc:
            log.warning("could not record reachability: %s", exc, extra={"action": "reachability_failed"})

    async def probe_devices(self) -> None:
        """Probe every device whose tunnel is fine: a fresh handshake proves the tunnel, not the device."""
        if self._probe is None:
            return
        probe = self._probe
        devices = [d for d in self._devices() if d.id in self.hosts()]

        async def one(dev: Device) -> None:
            if not self.verdict(dev).reachable:
                self.silent.pop(dev.id, None)  # the tunnel is the problem; the device is unknown
                return
            try:
                await probe(dev)
            except AgentError as exc:
                self.silent[dev.id] = str(exc)
            except TimeoutError:
                self.silent[dev.id] = "no answer to the probe"
            else:
                self.silent.pop(dev.id, None)

        await asyncio.gather(*(one(d) for d in devices))
        for gone in self.silent.keys() - {d.id for d in devices}:
            del self.silent[gone]

    async def _probing(self) -> None:
        while True:
            await asyncio.sleep(self._probe_interval)
            await self.probe_devices()
            self._kick.set()

    async def run(self) -> None:
        prober = asyncio.create_task(self._probing()) if self._probe and self._probe_interval > 0 else None
        try:
            await self._sample_forever()
        finally:
            if prober is not None:
                prober.cancel()
            await self.resolver.close()

    def resumed(self) -> list[str]:
        """Devices paused at the last look and not now (resumed or removed): their parked work may go."""
        paused = {d.id for d in self._devices() if d.paused is not None}
        gone, self._paused = sorted(self._paused - paused), paused
        for device in gone:
            log.info("%s resumed: its parked work goes now", device, extra={"action": "resumed", "device": device})
        return gone

    async def _sample_forever(self) -> None:
        while True:
            self.resolver.kick(d.address for d in self._devices())
            if self.hosts() or self.monitor.interface:
                await self.check()
            else:
                self.reach.clear()
            if resumed := self.resumed():
                await self._on_reachable(resumed)
            with contextlib.suppress(TimeoutError):  # asyncio.timeout, not wait_for: see agent/reconcile/reconciler.py
                async with asyncio.timeout(self._interval):
                    await self._kick.wait()
            self._kick.clear()

    async def wait_for_tunnel(self, grace: float, say: Callable[[str], None]) -> None:
        """Start-up self-check: return once a WireGuard interface is there (or nothing needs one).
        Until then the agent is not ready and says why (STATUS=, /readyz, /status); it waits, since
        a tunnel that comes up late at boot must not leave the site without an agent. After `grace`
        the wait is logged as an error, and again every ten minutes, so that it is noticed."""
        told, loud_at = False, time.monotonic() + grace
        self.resolver.kick(d.address for d in self._devices())  # names resolve meanwhile, never awaited here
        while True:
            snap = await self.check()
            problem = start_problem(snap, self.hosts()) if self.required else None
            if problem is None:
                if told:
                    log.info("WireGuard interface %s is there: starting", snap.interface,
                             extra={"action": "vpn_found"})
                return
            if not told:
                log.warning("not in the VPN's network namespace (yet): %s; waiting for it. %s", problem, REMEDY,
                            extra={"action": "vpn_missing"})
                say(f"not ready: {problem}")
                told = True
            if time.monotonic() >= loud_at:
                log.error("still not in the VPN's network namespace: %s; %s", problem, REMEDY,
                          extra={"action": "vpn_missing"})
                loud_at = time.monotonic() + 600
            await asyncio.sleep(2.0)
