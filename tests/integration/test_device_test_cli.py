"""`agentctl device test` as a subprocess, against real Postgres and devices on loopback: it says
what it found or the error and its fix, exits non-zero on failure, and writes nothing to the device."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from subprocess import CompletedProcess

import asyncpg
import pytest

from agent.model.device import Device
from agent.ops import admin
from tests.drivers.target_http import OPTIONS, PASSWORD, USER, CheckedHttpDevice
from tests.support.agents import agentctl
from tests.support.slowserver import refusing_port


@pytest.fixture
async def box() -> AsyncIterator[CheckedHttpDevice]:
    dev = await CheckedHttpDevice(USER, PASSWORD).start()
    dev.secrets = {"alice": "true"}
    yield dev
    await dev.stop()


@pytest.fixture
def creds(tmp_path: Path) -> Path:
    d = tmp_path / "credentials"
    d.mkdir()
    (d / "box-admin").write_text(json.dumps({"username": USER, "password": PASSWORD}))
    return d


async def device_test(dsn: str, creds: Path, *args: str) -> CompletedProcess[str]:
    """Run it off the event loop, so the in-process test device can answer meanwhile."""
    return await asyncio.to_thread(agentctl, dsn, "device", "test", *args, check=False, credentials_dir=creds)


async def add(db: asyncpg.Connection, *devices: Device) -> None:
    await admin.upsert_devices(db, list(devices))


async def test_sim_device_is_read_and_its_state_file_left_untouched(db, dsn, creds, tmp_path):
    state_file = tmp_path / "sim.json"
    state_file.write_text('{"wifi": "on"}')
    before = state_file.stat().st_mtime_ns
    await add(db, Device("sim-1", "sim", options={"state_file": str(state_file)}))
    proc = await device_test(dsn, creds, "sim-1", "--service", "wifi")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "PASS  probe: answers" in proc.stdout
    assert "PASS  read wifi: on" in proc.stdout
    assert proc.stdout.rstrip().endswith("device sim-1 can be driven")
    assert state_file.read_text() == '{"wifi": "on"}' and state_file.stat().st_mtime_ns == before


async def test_without_service_nothing_is_read(db, dsn, creds):
    await add(db, Device("sim-2", "sim"))
    proc = await device_test(dsn, creds, "sim-2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "PASS  read" not in proc.stdout and "PASS  credential: none named" in proc.stdout
    assert "no service was read: add --service KEY" in proc.stdout


async def test_http_device_answers_with_the_state_and_nothing_is_written(db, dsn, creds, box):
    await add(db, Device("box", "http", f"127.0.0.1:{box.port}", options=OPTIONS, credential="box-admin"))
    proc = await device_test(dsn, creds, "box", "--service", "alice")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "PASS  credential: box-admin present (value not shown)" in proc.stdout
    assert "PASS  read alice: off" in proc.stdout
    assert [method for method, _path in box.requests] == ["GET"]
    assert box.secrets == {"alice": "true"}
    assert PASSWORD not in proc.stdout + proc.stderr


async def test_unreachable_device_fails_with_the_vpn_fix_and_exit_1(db, dsn, creds):
    with refusing_port() as port:
        await add(db, Device("gone", "http", f"127.0.0.1:{port}", options=OPTIONS, credential="box-admin"))
        proc = await device_test(dsn, creds, "gone", "--service", "alice")
    assert proc.returncode == 1
    assert "FAIL  probe: unreachable: " in proc.stdout
    assert "fix: check the VPN" in proc.stdout and "agentctl doctor" in proc.stdout
    assert "SKIP  read alice: not run" in proc.stdout


async def test_missing_service_is_a_permanent_error_in_json(db, dsn, creds, box):
    await add(db, Device("box", "http", f"127.0.0.1:{box.port}", options=OPTIONS, credential="box-admin"))
    proc = await device_test(dsn, creds, "box", "--service", "nobody", "--json")
    assert proc.returncode == 1
    doc = json.loads(proc.stdout)
    assert doc["ok"] is False and doc["state"] is None
    read = doc["steps"][-1]
    assert (read["name"], read["kind"]) == ("read nobody", "permanent")
    assert "HTTP 404" in read["detail"] and "service key 'nobody'" in read["fix"]
    assert box.secrets == {"alice": "true"} and {m for m, _ in box.requests} == {"GET"}


async def test_missing_credential_file_is_a_config_error_before_any_io(db, dsn, creds, box):
    await add(db, Device("box", "http", f"127.0.0.1:{box.port}", options=OPTIONS, credential="no-such-file"))
    proc = await device_test(dsn, creds, "box", "--service", "alice")
    assert proc.returncode == 1
    assert "FAIL  credential: config: credential 'no-such-file' not found" in proc.stdout
    assert "fix: fix the option or credential" in proc.stdout
    assert box.requests == []


async def test_unknown_device_says_how_to_find_it(dsn, creds):
    proc = await device_test(dsn, creds, "nope")
    assert proc.returncode == 4  # agentctl's exit status for what a command names that does not exist
    assert "FAIL  inventory: no device 'nope'" in proc.stdout and "agentctl device list" in proc.stdout


@pytest.mark.fake_backed
async def test_a_routeros_list_no_firewall_rule_uses_fails_the_test_naming_it(db, dsn, creds):
    from tests.support.routeros_api_fake import RouterOsApiFake
    from tests.support.routeros_fake import RouterOsFake
    router = RouterOsFake("agent", "pw-Mt-51c0")
    router.version = "6.49.10 (long-term)"
    api = await RouterOsApiFake(router).start()
    try:
        (creds / "mt-agent").write_text("pw-Mt-51c0\n")
        await add(db, Device("mt-1", "routeros", api.address, options={"username": "agent"}, credential="mt-agent"))
        await db.execute("INSERT INTO agent.service_state (device, service) VALUES ($1, $2)",
                         "mt-1", "ip/firewall/address-list/blocked/10.0.0.7")
        proc = await device_test(dsn, creds, "mt-1")
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert "RouterOS 6.49.10 (long-term) over the API (api)" in proc.stdout
        assert "FAIL  suspension policy: config: address list 'blocked' is used by no enabled" in proc.stdout
        router.add("ip/firewall/filter", chain="forward", action="drop", src_address_list="blocked")
        proc = await device_test(dsn, creds, "mt-1")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert not [c for c in api.commands if not c[0].endswith(("/print", "/login"))], "nothing is written"
    finally:
        await api.stop()


@pytest.mark.fake_backed
async def test_doctor_names_a_routeros_list_no_firewall_rule_uses(db, dsn, creds):
    from tests.support.agents import agentctl as run_agentctl
    from tests.support.routeros_api_fake import RouterOsApiFake
    from tests.support.routeros_fake import RouterOsFake
    router = RouterOsFake("agent", "pw-Mt-77a2")
    api = await RouterOsApiFake(router).start()
    try:
        (creds / "mt-agent").write_text("pw-Mt-77a2\n")
        await add(db, Device("mt-2", "routeros", api.address, credential="mt-agent",
                             options={"username": "agent", "address_lists": ["suspended"]}))
        await db.execute("INSERT INTO agent.service_state (device, service) VALUES ($1, $2)",
                         "mt-2", "ip/firewall/address-list/blocked/10.0.0.7")
        router.add("ip/firewall/filter", chain="forward", action="drop", src_address_list="blocked")
        proc = await asyncio.to_thread(run_agentctl, dsn, "doctor", check=False, credentials_dir=creds)
        assert proc.returncode == 1, proc.stdout + proc.stderr
        [line] = [ln for ln in proc.stdout.splitlines() if "suspension policy mt-2" in ln]
        assert "address list 'suspended' is used by no enabled" in line and "'blocked'" not in line
    finally:
        await api.stop()
