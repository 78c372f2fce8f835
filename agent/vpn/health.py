"""Pure judgements about the tunnel: is a peer alive, does a device's route go through it, may a
command for a device run now. No I/O here; the monitor gathers the facts.

How fast each signal sees an outage (with WireGuard's defaults and a keepalive of K seconds):
- interface missing or down, route not through the tunnel: at the next sample (AGENT_VPN_CHECK_INTERVAL);
- receive silence: a peer with persistent keepalive sends at least every K s, so no bytes received
  for 2K + 3 s means the session is suspect — about 53 s with the common K = 25, 5 s with K = 1;
- devices failing together: two devices behind one peer found unreachable within 15 s marks the peer
  suspect at once (cleared by the next success or fresh traffic);
- handshake age: a live session re-handshakes about every 2 minutes, so older than 180 s
  (AGENT_VPN_STALE_AFTER) means its keys are dead — the slowest and surest signal.
A fresh handshake proves the tunnel, not the device: devices are probed as well.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from agent.model.device import Device
from agent.vpn.wg import WgPeer

CORRELATION_WINDOW = 15.0


@dataclass(frozen=True)
class PeerVerdict:
    peer: str
    up: bool
    reason: str
    handshake_age: float | None
    endpoint: str | None = None
    rx_bytes: int = 0
    tx_bytes: int = 0


@dataclass
class VpnSnapshot:
    interface: str | None                    # the WireGuard interface in use, if any
    interface_up: bool = False
    problem: str | None = None               # why there is no usable interface
    peers: list[WgPeer] = field(default_factory=list)
    verdicts: dict[str, PeerVerdict] = field(default_factory=dict)  # public key -> verdict
    routes: dict[str, str | None] = field(default_factory=dict)     # device address -> outgoing interface


@dataclass(frozen=True)
class GateVerdict:
    reachable: bool
    reason: str
    peer: str | None = None


def judge_peer(peer: WgPeer, now: float, rx_changed_at: float | None, stale_after: float = 180.0,
               failed_together_at: float | None = None) -> PeerVerdict:
    age = None if peer.latest_handshake is None else max(0.0, now - peer.latest_handshake)
    def verdict(up: bool, reason: str) -> PeerVerdict:
        return PeerVerdict(peer.name, up, reason, age, peer.endpoint, peer.rx_bytes, peer.tx_bytes)

    if age is None:
        return verdict(False, "no handshake yet")
    if age > stale_after:
        return verdict(False, f"handshake {age:.0f} s old (> {stale_after:.0f} s)")
    if peer.keepalive and rx_changed_at is not None and now - rx_changed_at > 2 * peer.keepalive + 3:
        return verdict(False, f"nothing received for {now - rx_changed_at:.0f} s (keepalive {peer.keepalive} s)")
    if failed_together_at is not None and now - failed_together_at < CORRELATION_WINDOW:
        return verdict(False, "every recent try through it failed")
    return verdict(True, f"handshake {age:.0f} s ago")


def peer_for(address: str, peers: list[WgPeer]) -> WgPeer | None:
    """The peer whose allowed IPs cover the address, most specific first (cryptokey routing)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return None
    best: tuple[int, WgPeer] | None = None
    for peer in peers:
        for net in peer.allowed_ips:
            if ip.version == net.version and ip in net and (best is None or net.prefixlen > best[0]):
                best = (net.prefixlen, peer)
    return best[1] if best else None


def gate(device: Device, host: str | None, snap: VpnSnapshot) -> GateVerdict:
    """May a command for this device run now, as far as the tunnel is concerned?"""
    if host is None:
        return GateVerdict(True, "no network address: needs no tunnel")
    if snap.interface is None:
        return GateVerdict(False, f"no_interface: {snap.problem or 'no WireGuard interface'}")
    if not snap.interface_up:
        return GateVerdict(False, f"interface_down: {snap.interface} is down")
    oif = snap.routes.get(host)
    if oif != snap.interface:
        return GateVerdict(False, f"route_not_via_tunnel: {host} leaves by {oif or 'no route'}, "
                                  f"not {snap.interface}")
    peer = peer_for(host, snap.peers)
    if peer is None:
        return GateVerdict(False, f"no_peer_covers_address: no peer of {snap.interface} allows {host}")
    verdict = snap.verdicts.get(peer.public_key)
    if verdict is not None and not verdict.up:
        return GateVerdict(False, f"peer_down: {peer.name}: {verdict.reason}", peer.name)
    return GateVerdict(True, f"through {snap.interface} peer {peer.name}", peer.name)
