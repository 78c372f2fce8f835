"""Reconciliation with real agentd processes: one leader per site, takeover, drift repaired,
manual sync and its dry run."""

from __future__ import annotations

import asyncio
import json
import signal
import time

import pytest

from agent.db.leadership import current_leader
from tests.support.agents import agentctl, spawn_agentd
from tests.support.db import add_device, send
from tests.support.wait import until

pytestmark = pytest.mark.acceptance

TAKEOVER_BOUND = 5.0  # docs/operations.md: a stopped leader is replaced at once, a killed one at the next try


async def leader_of(db, site: str = "default") -> str | None:
    row = await current_leader(db, site)
    return row["application_name"].removeprefix("agentd session ") if row else None


def device_file(tmp_path, name: str = "r1"):
    return tmp_path / f"{name}.json"


async def setup_device(db, tmp_path, name: str = "r1", **states: str) -> None:
    """A sim device whose state lives in a file (so the test can change it behind the agent's back),
    with the given services commanded and verified first."""
    await add_device(db, name, "sim", {"state_file": str(device_file(tmp_path, name))})
    for service, state in states.items():
        await send(db, {"device": name, "service": service, "state": state})


def read_device(tmp_path, name: str = "r1") -> dict[str, str]:
    return json.loads(device_file(tmp_path, name).read_text() or "{}")


def edit_device(tmp_path, name: str = "r1", **states: str) -> None:
    """Someone changes the device by hand."""
    path = device_file(tmp_path, name)
    path.write_text(json.dumps({**read_device(tmp_path, name), **states}))


async def verified(db, device: str, service: str, state: str) -> bool:
    row = await db.fetchrow("SELECT desired, observed FROM agent.service_state WHERE device = $1 AND service = $2",
                            device, service)
    return row is not None and (row["desired"], row["observed"]) == (state, state)


async def agent_backends(db, agent_id: str) -> list[str]:
    rows = await db.fetch("SELECT application_name FROM pg_stat_activity WHERE datname = current_database() "
                          "AND application_name LIKE 'agentd%' AND application_name LIKE '%' || $1", agent_id)
    return [r["application_name"] for r in rows]


async def test_one_leader_per_site_and_a_killed_leader_is_replaced_by_the_next_try(db, dsn):
    first = spawn_agentd(dsn, agent_id="a1", reconcile_schedule="off", leader_check_interval=1)
    await until(lambda: leader_of(db), timeout=15, what="a leader elected")
    second = spawn_agentd(dsn, agent_id="a2", reconcile_schedule="off", leader_check_interval=1)
    await until(lambda: db.fetchval("SELECT count(*) = 2 FROM agent.agents WHERE state = 'ready'"), timeout=30,
                what="both agents ready")
    assert await leader_of(db) == "a1"
    # a2 is a standby on its one session connection: no second connection waits in Postgres
    assert await db.fetchval("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted") == 0
    assert await agent_backends(db, "a2") == ["agentd session a2"]

    first.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    await until(lambda: _is(leader_of(db), "a2"), timeout=TAKEOVER_BOUND, what="a2 takes over")
    took = time.monotonic() - killed
    assert second.poll() is None, f"takeover after {took:.2f}s"


async def test_a_leader_that_stops_hands_over_at_once_not_at_the_next_try(db, dsn):
    """A standby that would ask again only after 300 s takes over at once: the stopping leader lets go
    of the lock and tells the site's standbys."""
    first = spawn_agentd(dsn, agent_id="a1", reconcile_schedule="off")
    await until(lambda: _is(leader_of(db), "a1"), timeout=15, what="a1 leads")
    spawn_agentd(dsn, agent_id="a2", reconcile_schedule="off", leader_check_interval=300)
    await until(lambda: db.fetchval("SELECT count(*) = 2 FROM agent.agents WHERE state = 'ready'"), timeout=30,
                what="both agents ready")
    first.send_signal(signal.SIGTERM)
    await until(lambda: _is(leader_of(db), "a2"), timeout=TAKEOVER_BOUND, what="a2 takes over at once")
    assert first.wait(timeout=15) == 0


async def test_a_leader_whose_connection_is_cut_stops_leading_and_another_takes_over(db, dsn):
    spawn_agentd(dsn, agent_id="a1", reconcile_schedule="off", leader_check_interval=1)
    await until(lambda: _is(leader_of(db), "a1"), timeout=15, what="a1 leads")
    spawn_agentd(dsn, agent_id="a2", reconcile_schedule="off", leader_check_interval=1)
    await until(lambda: db.fetchval("SELECT count(*) = 2 FROM agent.agents WHERE state = 'ready'"), timeout=30,
                what="both agents ready")
    cut = await db.fetchval("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                            "WHERE application_name = 'agentd session a1'")
    assert cut
    await until(lambda: _is(leader_of(db), "a2"), timeout=TAKEOVER_BOUND, what="a2 takes over")
    # a1 reconnects as a standby, not as a second leader
    await until(lambda: db.fetchval("SELECT count(*) FROM pg_stat_activity WHERE application_name = "
                                    "'agentd session a1'"), timeout=15, what="a1 back as standby")
    assert await leader_of(db) == "a2"


async def test_sites_whose_names_share_a_32_bit_hash_each_have_their_own_leader(db, dsn):
    a, b = "site-15113", "site-59323"  # hashtext() gives both the same number
    assert await db.fetchval("SELECT hashtext($1) = hashtext($2)", a, b)
    for site, queue in ((a, "tasks_a"), (b, "tasks_b")):
        await asyncio.to_thread(agentctl, dsn, "db", "init", "--site", site, "--queue", queue)
    spawn_agentd(dsn, agent_id="ka", site=a, queue="tasks_a", reconcile_schedule="off", leader_check_interval=1)
    await until(lambda: _is(leader_of(db, a), "ka"), timeout=30, what="site-15113 led")
    spawn_agentd(dsn, agent_id="kb", site=b, queue="tasks_b", reconcile_schedule="off", leader_check_interval=1)
    await until(lambda: _is(leader_of(db, b), "kb"), timeout=30, what="site-59323 led by its own agent")
    assert await leader_of(db, a) == "ka"
    fleet = json.loads((await asyncio.to_thread(agentctl, dsn, "status", "--fleet", "--all-sites", "--json")).stdout)
    assert {s["site"]: s["leader"] for s in fleet["sites"] if s["site"] != "default"} == {a: "ka", b: "kb"}


async def test_drift_made_behind_the_agents_back_is_repaired_within_one_cycle(db, dsn, tmp_path):
    await setup_device(db, tmp_path, wifi="on", voip="off")
    spawn_agentd(dsn, reconcile_schedule="2")  # a cycle every 2 s
    await until(lambda: verified(db, "r1", "wifi", "on"), timeout=15, what="commands applied")
    await until(lambda: verified(db, "r1", "voip", "off"), timeout=15, what="commands applied")

    edit_device(tmp_path, wifi="off", voip="on")  # someone edits the router by hand
    await until(lambda: read_device(tmp_path) == {"wifi": "on", "voip": "off"}, timeout=8,
                what="drift repaired by the next cycle")
    # the device is repaired before the run's report commits: wait for the report, not a moment
    await until(lambda: db.fetchval("SELECT count(*) = 2 FROM agent.events WHERE kind = 'repaired'"), timeout=10,
                what="the repairs recorded")
    drift = await db.fetch("SELECT service, desired, observed, error FROM agent.events WHERE kind = 'drift' "
                           "ORDER BY service")
    assert [(r["service"], r["desired"], r["observed"]) for r in drift] == [("voip", "off", "on"),
                                                                            ("wifi", "on", "off")]
    assert drift[0]["error"] == "expected off, found on"
    repaired = await db.fetchval("SELECT count(*) FROM agent.events WHERE kind = 'repaired'")
    assert repaired == 2
    run = await until(lambda: db.fetchrow("SELECT * FROM agent.sync_runs WHERE repaired > 0 AND finished_at "
                                          "IS NOT NULL"), timeout=5, what="the run recorded")
    assert (run["kind"], run["checked"], run["drifted"], run["repaired"]) == ("scheduled", 2, 2, 2)
    assert await verified(db, "r1", "wifi", "on") and await verified(db, "r1", "voip", "off")


async def test_a_paused_device_holds_up_no_scheduled_run_and_the_others_drift_is_still_repaired(db, dsn, tmp_path):
    """In a fleet some device is nearly always off: its site's scheduled runs must go on finishing."""
    await setup_device(db, tmp_path, "r1", wifi="on")
    await setup_device(db, tmp_path, "r2", wifi="on")
    agent = spawn_agentd(dsn, reconcile_schedule="2", vpn_check_interval=0.5)
    await until(lambda: verified(db, "r1", "wifi", "on"), timeout=15, what="commands applied")
    await until(lambda: verified(db, "r2", "wifi", "on"), timeout=15, what="commands applied")

    await asyncio.to_thread(agentctl, dsn, "device", "pause", "r1", "--reason", "firmware upgrade")
    skipped = await until(lambda: db.fetchrow(
        "SELECT r.id, d.skipped FROM agent.sync_devices d JOIN agent.sync_runs r ON r.id = d.run "
        "WHERE d.device = 'r1' AND d.skipped IS NOT NULL AND r.finished_at IS NOT NULL ORDER BY r.id LIMIT 1"),
        timeout=30, what="a scheduled run finished with the paused device reported not checked")
    assert skipped["skipped"] == "paused: firmware upgrade"
    shown = await asyncio.to_thread(agentctl, dsn, "sync", "--show", str(skipped["id"]), check=False)
    assert shown.returncode == 1 and "  r1: not checked: paused: firmware upgrade" in shown.stdout.splitlines()

    edit_device(tmp_path, "r2", wifi="off")  # drift on the healthy device, after the paused one was met
    await until(lambda: read_device(tmp_path, "r2") == {"wifi": "on"}, timeout=30,
                what="the healthy device's drift repaired by a later scheduled run")
    repairing = await until(lambda: db.fetchrow(
        "SELECT * FROM agent.sync_runs WHERE kind = 'scheduled' AND repaired = 1 AND finished_at IS NOT NULL"),
        timeout=30, what="the repairing run finished")
    assert repairing["id"] > skipped["id"]
    # runs keep finishing while r1 stays paused, each reporting it not checked
    await until(lambda: db.fetchval(
        "SELECT count(*) >= 2 FROM agent.sync_runs r JOIN agent.sync_devices d ON d.run = r.id "
        "WHERE d.device = 'r1' AND r.id > $1 AND r.finished_at IS NOT NULL AND d.skipped LIKE 'paused: %'",
        repairing["id"]), timeout=30, what="later scheduled runs finished too")
    assert read_device(tmp_path, "r1") == {"wifi": "on"}
    assert agent.poll() is None


async def test_manual_sync_dry_run_shows_drift_and_sync_repairs_it(db, dsn, tmp_path):
    await setup_device(db, tmp_path, wifi="on")
    await setup_device(db, tmp_path, "r2", wifi="off")
    spawn_agentd(dsn, reconcile_schedule="off")
    await until(lambda: verified(db, "r2", "wifi", "off"), timeout=15, what="commands applied")
    await until(lambda: verified(db, "r1", "wifi", "on"), timeout=15, what="commands applied")
    edit_device(tmp_path, wifi="off")

    dry = await asyncio.to_thread(agentctl, dsn, "sync", "--dry-run", check=False)
    assert dry.returncode == 1, dry.stderr
    assert "2 device(s), 2 service(s) checked: 1 in sync, 1 drifted, 0 repaired" in dry.stdout
    assert "r1/wifi: drift (expected on, found off)" in dry.stdout
    assert read_device(tmp_path) == {"wifi": "off"}  # nothing repaired

    fix = await asyncio.to_thread(agentctl, dsn, "sync", "--device", "r1", "--json", check=False)
    assert fix.returncode == 0, fix.stderr
    report = json.loads(fix.stdout)
    assert (report["devices"], report["repaired"]) == (1, 1)
    assert report["items"] == [{"device": "r1", "service": "wifi", "expected": "on", "found": "off",
                                "result": "repaired", "error": None}]  # what it found before the repair
    assert read_device(tmp_path) == {"wifi": "on"}

    unknown = await asyncio.to_thread(agentctl, dsn, "sync", "--device", "nope", check=False)
    assert unknown.returncode == 4 and "no device 'nope' in site 'default'" in unknown.stderr


async def test_reconcile_never_overrides_a_newer_command(db, dsn, tmp_path):
    """A sync asked for while newer commands arrive converges to the newest desired state."""
    await setup_device(db, tmp_path, wifi="on")
    spawn_agentd(dsn, reconcile_schedule="off")
    await until(lambda: verified(db, "r1", "wifi", "on"), timeout=15, what="first command")
    edit_device(tmp_path, wifi="off")
    run = int((await asyncio.to_thread(agentctl, dsn, "sync", "--no-wait")).stdout)
    await send(db, {"device": "r1", "service": "wifi", "state": "off"})  # newer than what the sync saw asked
    await send(db, {"device": "r1", "service": "wifi", "state": "on"})
    await send(db, {"device": "r1", "service": "wifi", "state": "off"})
    await until(lambda: db.fetchval("SELECT finished_at IS NOT NULL FROM agent.sync_runs WHERE id = $1", run),
                timeout=15, what="sync finished")
    await until(lambda: verified(db, "r1", "wifi", "off"), timeout=15, what="newest command applied")
    assert read_device(tmp_path) == {"wifi": "off"}


async def _is(coro, expected) -> bool:
    return await coro == expected
