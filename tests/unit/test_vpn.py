"""Tunnel judgements from recorded `wg show dump` output and route facts: no network needed."""

from __future__ import annotations

import ipaddress

import pytest

from agent.model.device import Device
from agent.vpn.guard import VpnGuard, start_problem
from agent.vpn.health import VpnSnapshot, gate, judge_peer, peer_for
from agent.vpn.monitor import device_host
from agent.vpn.wg import WgPeer, parse_dump

PRIVATE = "aGVsbG8tdGhpcy1pcy1hLXByaXZhdGUta2V5LXh4eHg="
PRESHARED = "cHJlc2hhcmVkLXNlY3JldC1rZXktZG8tbm90LWxlYWs="
DUMP = (f"{PRIVATE}\tPubOfTheGatewayAAAAAAAAAAAAAAAAAAAAAAAAAAA=\t51820\toff\n"
        f"SiteNorthPeerAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\t{PRESHARED}\t203.0.113.5:51820\t10.88.0.0/24,10.77.0.2/32"
        "\t1732270000\t123456\t654321\t25\n"
        "SiteSouthPeerAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\t(none)\t(none)\t10.89.0.0/16\t0\t0\t148\toff\n")


def test_dump_is_parsed_and_no_secret_is_kept():
    iface = parse_dump("wg0", DUMP)
    north, south = iface.peers
    assert (iface.listen_port, north.endpoint, north.keepalive, north.rx_bytes) == (51820, "203.0.113.5:51820", 25,
                                                                                   123456)
    assert north.allowed_ips == [ipaddress.ip_network("10.88.0.0/24"), ipaddress.ip_network("10.77.0.2/32")]
    assert (south.endpoint, south.latest_handshake, south.keepalive) == (None, None, None)
    assert PRIVATE not in repr(iface) and PRESHARED not in repr(iface)


def test_broken_dump_is_refused():
    with pytest.raises(ValueError):
        parse_dump("wg0", "")


def peer(**kw) -> WgPeer:
    base = {"public_key": "K" * 44, "endpoint": "e:1", "allowed_ips": [ipaddress.ip_network("10.88.0.0/24")],
            "latest_handshake": 1000.0, "rx_bytes": 10, "tx_bytes": 10, "keepalive": 1}
    return WgPeer(**{**base, **kw})


def test_fresh_peer_is_up():
    assert judge_peer(peer(), now=1060, rx_changed_at=1059).up


def test_stale_or_missing_handshake_is_down():
    assert "181 s old" in judge_peer(peer(), now=1181, rx_changed_at=1180).reason
    assert not judge_peer(peer(latest_handshake=None), now=1000, rx_changed_at=None).up


def test_receive_silence_of_a_keepalive_peer_is_seen_before_the_handshake_goes_stale():
    v = judge_peer(peer(keepalive=1), now=1010, rx_changed_at=1004)
    assert not v.up and "nothing received for 6 s" in v.reason
    assert judge_peer(peer(keepalive=None), now=1010, rx_changed_at=1004).up  # no keepalive: no such signal


def test_devices_failing_together_mark_the_peer_down():
    assert not judge_peer(peer(), now=1010, rx_changed_at=1010, failed_together_at=1005).up
    assert judge_peer(peer(), now=1030, rx_changed_at=1030, failed_together_at=1005).up


def test_most_specific_allowed_ips_win():
    wide = peer(public_key="W" * 44, allowed_ips=[ipaddress.ip_network("10.0.0.0/8")])
    narrow = peer(public_key="N" * 44, allowed_ips=[ipaddress.ip_network("10.88.0.0/24")])
    assert peer_for("10.88.0.9", [wide, narrow]) is narrow
    assert peer_for("10.1.0.1", [wide, narrow]) is wide and peer_for("192.0.2.1", [wide]) is None


def snapshot(**kw) -> VpnSnapshot:
    p = peer()
    base = {"interface": "wg0", "interface_up": True, "peers": [p],
            "verdicts": {p.public_key: judge_peer(p, 1060, 1059)}, "routes": {"10.88.0.5": "wg0"}}
    return VpnSnapshot(**{**base, **kw})


DEV = Device("r1", "http", "https://10.88.0.5:8443")


@pytest.mark.parametrize("snap, reachable, reason", [
    (snapshot(), True, "through wg0"),
    (snapshot(interface=None, problem="no WireGuard interface in this network namespace"), False, "no_interface"),
    (snapshot(interface_up=False), False, "interface_down"),
    (snapshot(routes={"10.88.0.5": "eth0"}), False, "route_not_via_tunnel: 10.88.0.5 leaves by eth0"),
    (snapshot(peers=[]), False, "no_peer_covers_address"),
])
def test_gate(snap, reachable, reason):
    v = gate(DEV, "10.88.0.5", snap)
    assert v.reachable is reachable and v.reason.startswith(reason)


def test_gate_parks_behind_a_dead_peer_and_never_for_devices_without_address():
    p = peer()
    dead = snapshot(verdicts={p.public_key: judge_peer(p, 1300, 1299)})
    assert gate(DEV, "10.88.0.5", dead).reason.startswith("peer_down")
    assert gate(Device("s1", "sim"), None, dead).reachable


def test_only_a_missing_interface_holds_the_start_back_not_one_device_routed_elsewhere():
    assert start_problem(snapshot(), {"r1": "10.88.0.5"}) is None
    astray = snapshot(routes={"10.88.0.5": "eth0"})
    assert start_problem(astray, {"r1": "10.88.0.5", "r2": "10.88.0.6"}) is None
    assert gate(DEV, "10.88.0.5", astray).reason.startswith("route_not_via_tunnel: 10.88.0.5 leaves by eth0")
    assert start_problem(VpnSnapshot(None, problem="no WireGuard interface"), {"r1": "10.88.0.5"}) == \
        "no WireGuard interface"
    assert start_problem(VpnSnapshot(None), {}) is None  # only simulated devices: nothing needs the tunnel


async def _never(_devices: list[str]) -> None:
    raise AssertionError("nothing becomes reachable here")


@pytest.mark.parametrize("required", [True, False])
def test_a_device_whose_name_does_not_resolve_is_parked_not_let_through(required):
    named = Device("r9", "http", "https://router-9.invalid/rest")
    guard = VpnGuard(required, "wg0", 180, 1, lambda: [named], None, "a1", _never)  # type: ignore[arg-type]
    verdict = guard.verdict(named, snapshot())
    assert not verdict.reachable and verdict.reason.startswith("unresolved: router-9.invalid does not resolve")
    assert guard.verdict(Device("s1", "sim"), snapshot()).reachable  # no address: needs no tunnel


@pytest.mark.parametrize("address, host", [("10.88.0.5", "10.88.0.5"), ("10.88.0.5:8080", "10.88.0.5"),
                                           ("https://10.88.0.5/rest", "10.88.0.5"), ("[fd00::5]:443", "fd00::5"),
                                           (None, None)])
def test_device_host(address, host):
    assert device_host(address) == host
