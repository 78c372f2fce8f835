"""Samples the tunnel: which WireGuard interface, is it up, its peers, and the kernel's route to
each device (pyroute2, netlink). Keeps the little history the judgements need (when each peer's
receive counter last moved; which devices just failed). Never sees or keeps a private key."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from urllib.parse import urlsplit

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from agent.errors import TransientError
from agent.vpn import wg
from agent.vpn.health import CORRELATION_WINDOW, VpnSnapshot, judge_peer, peer_for

IFF_UP = 0x1


def device_host(address: str | None) -> str | None:
    """The IP an address (host, host:port, [v6]:port or URL) points at; names are resolved."""
    if not address:
        return None
    host = urlsplit(address if "://" in address else f"//{address}").hostname
    if not host:
        return None
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    try:
        return str(socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)[0][4][0])
    except OSError:
        return None


class VpnMonitor:
    def __init__(self, interface: str | None = None, stale_after: float = 180.0) -> None:
        self.interface = interface
        self.stale_after = stale_after
        self._rx: dict[str, tuple[int, float]] = {}        # peer key -> (rx bytes, when it last moved)
        self._heard: dict[str, float] = {}                 # peer key -> unix time it was surely heard after
        self._sampled_at: float | None = None              # unix time of the previous sample
        self._failures: dict[str, dict[str, float]] = {}   # peer key -> {device id: when}
        self._together: dict[str, float] = {}              # peer key -> when devices failed together
        self.last: VpnSnapshot = VpnSnapshot(None, problem="not sampled yet")

    async def sample(self, hosts: list[str]) -> VpnSnapshot:
        snap = await self._interface()
        if snap.interface is not None:
            snap.interface_up = await asyncio.to_thread(_link_up, snap.interface)
            try:
                dump = await wg.read_dump(snap.interface)
            except TransientError as exc:
                snap.problem = str(exc)
            else:
                snap.peers = dump.peers
                now = time.time()
                for peer in dump.peers:
                    snap.verdicts[peer.public_key] = judge_peer(
                        peer, now, self._rx_moved(peer.public_key, peer.rx_bytes, time.monotonic(), now),
                        self.stale_after, self._together.get(peer.public_key))
                    if peer.latest_handshake:
                        self._heard[peer.public_key] = max(self._heard.get(peer.public_key, 0.0),
                                                           peer.latest_handshake)
                self._sampled_at = now
        snap.routes = await asyncio.to_thread(_routes, hosts)
        self.last = snap
        return snap

    async def _interface(self) -> VpnSnapshot:
        try:
            listed = await wg.interfaces()
        except TransientError as exc:
            return VpnSnapshot(None, problem=str(exc))
        # userspace WireGuard (wireguard-go) is listed through sockets in /var/run/wireguard, which other
        # network namespaces share: keep only the interfaces that exist in ours
        names = await asyncio.to_thread(_local_links, listed)
        if self.interface:
            if self.interface not in names:
                return VpnSnapshot(None, problem=f"WireGuard interface {self.interface} not found in this network "
                                                 f"namespace (found: {', '.join(names) or 'none'})")
            return VpnSnapshot(self.interface)
        if len(names) == 1:
            return VpnSnapshot(names[0])
        if not names:
            return VpnSnapshot(None, problem="no WireGuard interface in this network namespace")
        return VpnSnapshot(None, problem=f"several WireGuard interfaces ({', '.join(names)}): set AGENT_WG_INTERFACE")

    def _rx_moved(self, key: str, rx: int, mono: float, now: float) -> float | None:
        """Unix time the peer's receive counter last changed (as far as we have watched)."""
        prev = self._rx.get(key)
        if prev is None or prev[0] != rx:
            self._rx[key] = (rx, mono)
            if prev is not None:
                self._together.pop(key, None)  # fresh traffic clears the suspicion
                if self._sampled_at is not None:  # it arrived after the previous sample, surely
                    self._heard[key] = max(self._heard.get(key, 0.0), self._sampled_at)
            return now
        return now - (mono - prev[1])

    def heard_since(self, key: str, since: float) -> bool:
        """Did the peer surely send us something (bytes or a handshake) after unix time `since`?"""
        return self._heard.get(key, 0.0) >= since

    def device_failed(self, device_id: str, host: str | None) -> None:
        """A device behind a peer was unreachable: two of them within the window mark the peer suspect."""
        peer = peer_for(host, self.last.peers) if host else None
        if peer is None:
            return
        now = time.time()
        recent = {d: t for d, t in self._failures.get(peer.public_key, {}).items() if now - t < CORRELATION_WINDOW}
        recent[device_id] = now
        self._failures[peer.public_key] = recent
        if len(recent) >= 2:
            self._together[peer.public_key] = now



def _local_links(names: list[str]) -> list[str]:
    with IPRoute() as ip:
        return [n for n in names if ip.link_lookup(ifname=n)]


def _link_up(name: str) -> bool:
    with IPRoute() as ip:
        idx = ip.link_lookup(ifname=name)
        return bool(idx) and bool(ip.get_links(idx[0])[0]["flags"] & IFF_UP)


def _routes(hosts: list[str]) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    with IPRoute() as ip:
        names: dict[int, str] = {}
        for host in hosts:
            try:
                oif = ip.route("get", dst=host)[0].get_attr("RTA_OIF")
            except (NetlinkError, OSError, IndexError):
                out[host] = None
                continue
            if oif not in names:
                links = ip.get_links(oif)
                names[oif] = links[0].get_attr("IFLA_IFNAME") if links else str(oif)
            out[host] = names[oif]
    return out

