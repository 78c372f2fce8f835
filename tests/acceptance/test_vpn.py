"""agentd across a real WireGuard tunnel: namespaces, wireguard-go and a simulated device the test makes.

    ns A (agent)  wg 10.77.0.1 ==tunnel== wg 10.77.0.2  ns B (site): HTTP device on 10.88.0.1
    ns O (outside the VPN): only loopback

Postgres is reached over its Unix socket from every namespace. No packet leaves the test's namespaces.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from tests.support.agents import agentctl, spawn_agentd
from tests.support.db import dlq, events, state
from tests.support.netns import DEVICE_IP, Tunnel, wireguard_available
from tests.support.notify import NotifySocket
from tests.support.wait import until

pytestmark = [pytest.mark.acceptance,
              pytest.mark.skipif(bool(wireguard_available()), reason=f"WireGuard tests: {wireguard_available()}")]

PORT = 8728
ROUTER = ["--driver", "http", "--address", f"http://{DEVICE_IP}:{PORT}",
          "--option", "read_path=/rest/ppp/secret/{service}", "--option", "set_method=PATCH",
          "--option", "state_pointer=/disabled", "--option", 'on_value="false"', "--option", 'off_value="true"',
          "--option", 'set_body={"disabled": "{value}"}']
DISABLED = {"on": "false", "off": "true"}
FAST = {"device_timeout": 2, "vpn_check_interval": 1, "retry_base": 0.2, "retry_max": 1, "require_vpn": "true"}


@pytest.fixture
def site(dsn: str) -> Iterator[Tunnel]:
    tunnel = Tunnel()
    try:
        tunnel.start_device(PORT, ["alice", "bob", "carol"])
        agentctl(dsn, "device", "add", "r1", *ROUTER)
        agentctl(dsn, "device", "add", "r2", *ROUTER)  # a second device behind the same peer
        yield tunnel
    finally:
        tunnel.close()


def status_in(tunnel: Tunnel, dsn: str, port: int) -> dict:
    out = agentctl(dsn, "status", "--json", "--url", f"http://127.0.0.1:{port}/status", netns=tunnel.a, check=False)
    return json.loads(out.stdout)


async def reachability(db, device: str):
    return await db.fetchrow("SELECT reachable, reason, peer FROM agent.reachability WHERE device = $1", device)


async def test_doctor_passes_inside_the_tunnel_namespace_and_names_the_fix_outside(db, dsn, site):
    inside = agentctl(dsn, "doctor", netns=site.a, check=False, require_vpn="true")
    assert inside.returncode == 0, inside.stdout
    lines = inside.stdout.splitlines()
    names = [ln.split(":")[0] for ln in lines if ln[:4] in ("PASS", "FAIL", "SKIP")]
    assert names[:7] == ["PASS  database reachable", "PASS  PGMQ installed", "PASS  schema version",
                         "PASS  queue and DLQ", "PASS  notify trigger", "PASS  inventory",
                         "PASS  WireGuard interface"]
    assert f"PASS  route to r1: {DEVICE_IP} via {site.wg_a}, peer {site.public_b[:8]}" in lines
    assert any(ln.startswith(f"PASS  peer {site.public_b[:8]} handshake: handshake") for ln in lines)
    assert "PASS  probe r1: answers" in inside.stdout and lines[-1] == "all checks passed"

    outside = agentctl(dsn, "doctor", "--json", netns=site.outside, check=False, require_vpn="true")
    assert outside.returncode == 1
    report = json.loads(outside.stdout)
    by_name = {c["name"]: c for c in report["checks"]}
    assert report["ok"] is False and by_name["database reachable"]["ok"]
    assert not by_name["WireGuard interface"]["ok"]
    assert 'network_mode: "service:wireguard"' in by_name["WireGuard interface"]["remedy"]
    assert by_name["route to r1"]["detail"] == f"no route to {DEVICE_IP}"
    assert by_name["probe r1"]["skipped"]  # not tried: it cannot be reached from here


async def test_agent_outside_the_vpn_waits_not_ready_saying_why_and_stops_cleanly(dsn, site, tmp_path):
    """A tunnel that comes up late at boot must not leave the site without an agent: past
    AGENT_VPN_GRACE the agent logs an error and goes on waiting (not ready, the reason in STATUS=,
    /readyz and /status) instead of exiting for good."""
    notify = NotifySocket(tmp_path)
    try:
        proc = spawn_agentd(dsn, netns=site.outside, vpn_grace=0, require_vpn="true", NOTIFY_SOCKET=notify.path,
                            http_listen="127.0.0.1:9477")  # the namespace is the test's own: the port is free
        await until(lambda: any(s.startswith("not ready: no WireGuard interface") for s in notify.statuses()),
                    timeout=30, what="the reason in STATUS=")
        assert await asyncio.to_thread(http_get, site.outside, "http://127.0.0.1:9477/readyz") == \
            (503, {"ready": False})
        code, status = await asyncio.to_thread(http_get, site.outside, "http://127.0.0.1:9477/status")
        assert code == 200 and status["state"] == "starting" and "no WireGuard interface" in status["status"]
        assert proc.poll() is None, "the agent waits on past AGENT_VPN_GRACE"
        proc.terminate()
        out, _ = await asyncio.to_thread(proc.communicate, timeout=30)
    finally:
        notify.close()
    assert proc.returncode == 0, out
    said = [ln for ln in out.splitlines() if "still not in the VPN's network namespace" in ln]
    assert said and 'network_mode: "service:wireguard"' in said[0] and "no WireGuard interface" in said[0]
    assert not notify.with_key("READY")


def http_get(netns: str, url: str) -> tuple[int, dict]:
    """GET from inside a namespace: (status, JSON body)."""
    script = ("import json, sys, urllib.request, urllib.error\n"
              "try:\n    r = urllib.request.urlopen(sys.argv[1], timeout=10); code, body = r.status, r.read()\n"
              "except urllib.error.HTTPError as e:\n    code, body = e.code, e.read()\n"
              "print(json.dumps([code, json.loads(body)]))")
    done = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", script, url], capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    code, body = json.loads(done.stdout)
    return code, body


async def test_one_device_routed_outside_the_tunnel_is_parked_and_the_others_work(db, dsn, site):
    agentctl(dsn, "device", "add", "stray", "--driver", "http", "--address", "http://192.0.2.9:8728",
             "--option", "read_path=/x/{service}", "--option", "state_pointer=/s")
    spawn_agentd(dsn, netns=site.a, **FAST)
    agentctl(dsn, "enqueue", "stray", "alice", "off")
    agentctl(dsn, "enqueue", "r1", "alice", "on")
    await until(lambda: _observed(db, [("r1", "alice", "on")]), timeout=20, what="r1 worked on through the tunnel")
    stray = await until(lambda: _unreachable(db, "stray"), timeout=20, what="the stray device seen unreachable")
    assert stray["reason"].startswith("route_not_via_tunnel"), stray["reason"]
    parked = await until(lambda: _event(db, "stray", "parked"), timeout=20, what="its command parked")
    assert "route_not_via_tunnel" in parked["error"]
    assert await db.fetchval("SELECT count(*) FROM pgmq.q_device_tasks_dlq") == 0


async def _event(db, device: str, kind: str):
    return await db.fetchrow("SELECT * FROM agent.events WHERE device = $1 AND kind = $2 ORDER BY id DESC LIMIT 1",
                             device, kind)


async def test_commands_are_applied_through_the_tunnel(db, dsn, site):
    agentd = spawn_agentd(dsn, netns=site.a, **FAST)
    agentctl(dsn, "enqueue", "r1", "alice", "on")
    agentctl(dsn, "enqueue", "r2", "bob", "on")
    await until(lambda: site.device_secrets(PORT) == {"alice": "false", "bob": "false", "carol": "true"},
                timeout=20, what="both commands applied on the device")
    await until(lambda: _observed(db, [("r1", "alice", "on"), ("r2", "bob", "on")]), what="states reported")
    assert (await reachability(db, "r1"))["reachable"]
    assert agentd.poll() is None


async def _observed(db, expected: list[tuple[str, str, str]]) -> bool:
    for device, service, want in expected:
        row = await state(db, device, service)
        if row is None or (row["desired"], row["observed"]) != (want, want):
            return False
    return True


@pytest.mark.parametrize("outage", ["peer removed at the site", "interface down"])
async def test_outage_parks_work_and_recovery_applies_the_newest_commands_within_10s(db, dsn, site, outage):
    cut, restore = {"peer removed at the site": (site.cut_peer, site.restore_peer),
                    "interface down": (site.link_down, site.link_up)}[outage]
    http_port = 18000 + int(time.time()) % 1000
    spawn_agentd(dsn, netns=site.a, http_listen=f"127.0.0.1:{http_port}", max_attempts=2, **FAST)
    agentctl(dsn, "enqueue", "r1", "alice", "on")
    await until(lambda: _observed(db, [("r1", "alice", "on")]), timeout=20, what="tunnel works before the cut")

    cut()
    agentctl(dsn, "enqueue", "r1", "alice", "off")  # arrives before the agent can know: tried, fails, parked
    agentctl(dsn, "enqueue", "r2", "bob", "on")
    down = await until(lambda: _unreachable(db, "r1"), timeout=20, what="r1 seen unreachable")
    assert down["reason"].startswith(("peer_down", "interface_down", "route_not_via_tunnel")), down["reason"]
    for device, service, value in [("r1", "alice", "on"), ("r2", "bob", "off"), ("r1", "carol", "on"),
                                   ("r1", "alice", "off"), ("r2", "bob", "on")]:  # newest: alice off, bob on, carol on
        agentctl(dsn, "enqueue", device, service, value)
    await until(lambda: _parked(db, 5), timeout=20, what="commands parked during the outage")

    snap = status_in(site, dsn, http_port)
    assert {u["device"] for u in snap["unreachable"]} == {"r1", "r2"}
    assert not snap["healthy"] or snap["peers"]  # the outage is shown, not hidden
    if outage == "peer removed at the site":
        assert [p["state"] for p in snap["peers"]] == ["down"]
    assert await dlq(db) == []  # max_attempts=2, yet an outage never dead-letters

    restore()
    restored = time.monotonic()
    newest = [("r1", "alice", "off"), ("r2", "bob", "on"), ("r1", "carol", "on")]
    await until(lambda: _observed(db, newest), timeout=10, what="everything applied within 10 s of recovery")
    took = time.monotonic() - restored
    assert site.device_secrets(PORT) == {"alice": DISABLED["off"], "bob": DISABLED["on"], "carol": DISABLED["on"]}
    assert await dlq(db) == [] and "dead_lettered" not in await events(db)
    assert (await reachability(db, "r1"))["reachable"], f"recovered after {took:.1f} s"


async def test_a_device_down_behind_a_healthy_tunnel_is_an_ordinary_failure(db, dsn, site):
    spawn_agentd(dsn, netns=site.a, max_attempts=2, vpn_probe_interval=1, **FAST)
    agentctl(dsn, "enqueue", "r1", "alice", "on")
    await until(lambda: _observed(db, [("r1", "alice", "on")]), timeout=20, what="tunnel works")
    site.stop_device()
    agentctl(dsn, "enqueue", "r1", "alice", "off")
    [entry] = await until(lambda: dlq(db), timeout=30, what="the command dead-lettered after its attempts")
    assert entry["headers"]["reason"].startswith("gave up after 2 attempts: r1:"), entry
    assert "cannot connect" in entry["headers"]["reason"]
    assert "parked" not in await events(db)  # the tunnel was never blamed
    down = await until(lambda: _unreachable(db, "r1"), timeout=10, what="the probe sees the device down")
    assert down["reason"].startswith("device_not_answering: r1: cannot connect to 10.88.0.1:8728"), down["reason"]


async def _unreachable(db, device: str):
    row = await reachability(db, device)
    return row if row is not None and not row["reachable"] else None


async def _parked(db, at_least: int) -> bool:
    return await db.fetchval("SELECT count(DISTINCT msg_id) FROM agent.events WHERE kind = 'parked'") >= at_least


def teardown_module() -> None:
    # every namespace a test here made is gone, also after a failure
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not [ln for ln in left.splitlines() if ln.startswith(("agA", "agB", "agO"))], left


async def test_device_add_warns_when_the_address_is_not_routed_through_the_tunnel(dsn, site):
    stray = agentctl(dsn, "device", "add", "stray", "--driver", "http", "--address", "http://192.0.2.9:8728",
                     "--option", "read_path=/x/{service}", "--option", "state_pointer=/s", netns=site.a,
                     require_vpn="true")
    assert stray.returncode == 0  # saved all the same: the agent parks its work, the site goes on
    assert "warning: no route to 192.0.2.9 (as seen from this host)" in stray.stderr
    assert "the agent parks this device's work" in stray.stderr
    good = agentctl(dsn, "device", "add", "r3", *ROUTER, netns=site.a, require_vpn="true")
    assert "warning" not in good.stderr
