"""A reconcile waits for a device behind the gate only so long: then the run reports the device not
checked, with the reason, and finishes; a device that comes back in time is checked as usual."""

from __future__ import annotations

import time

from agent.vpn.guard import Reach
from tests.support.agents import running_agent
from tests.support.cluster import as_user, login_role
from tests.support.db import add_device
from tests.support.devices import ScriptedDriver
from tests.support.wait import until


async def setup(db, device: ScriptedDriver) -> None:
    await add_device(db, "r1", "scripted")
    await db.execute("INSERT INTO agent.service_state (device, service, desired, observed) VALUES ('r1', 'wifi', "
                     "'on', 'on')")
    device.states[("r1", "wifi")] = "on"


def tunnel_down(agent) -> None:
    """What the VPN guard records when r1's peer goes down (the next sample is minutes away)."""
    agent.vpn.reach["r1"] = Reach(False, "peer abcdefgh down: last handshake 200s ago", "abcdefgh", time.time())


async def sync(db, agent) -> int:
    await until(lambda: agent.leadership.leading, timeout=15, what="leader elected")
    return await db.fetchval("SELECT agent.request_sync('default', 'r1')")


async def test_an_unreachable_device_is_reported_not_checked_after_the_wait_and_its_run_finishes(db, dsn):
    device = ScriptedDriver()
    await setup(db, device)
    async with running_agent(dsn, device, vpn_check_interval=300, reconcile_unreachable_wait=1) as agent:
        tunnel_down(agent)
        run = await sync(db, agent)
        await until(lambda: db.fetchval("SELECT finished_at IS NOT NULL FROM agent.sync_runs WHERE id = $1", run),
                    timeout=20, what="the run finished without the device")
    row = await db.fetchrow("SELECT r.devices, r.checked, r.unreadable, d.state, d.skipped FROM agent.sync_runs r "
                            "JOIN agent.sync_devices d ON d.run = r.id WHERE r.id = $1", run)
    assert (row["devices"], row["unreadable"], row["state"]) == (1, 1, "done")
    assert row["skipped"].startswith("unreachable for ")
    assert row["skipped"].endswith("s: peer abcdefgh down: last handshake 200s ago")
    item = await db.fetchrow("SELECT service, result, error FROM agent.sync_items WHERE run = $1", run)
    assert (item["service"], item["result"]) == ("*", "unreadable")
    assert item["error"] == f"not checked: {row['skipped']}"
    assert device.calls == []  # nothing was tried behind a down tunnel


async def test_a_device_back_within_the_wait_is_checked(db, dsn):
    device = ScriptedDriver()
    await setup(db, device)
    async with running_agent(dsn, device, vpn_check_interval=300, reconcile_unreachable_wait=600) as agent:
        tunnel_down(agent)
        run = await sync(db, agent)
        await until(lambda: db.fetchval("SELECT count(*) > 0 FROM agent.events WHERE kind = 'parked' AND "
                                        "device = 'r1'"), timeout=15, what="the reconcile parked")
        del agent.vpn.reach["r1"]  # the tunnel is back
        await agent.wake_parked(["r1"])
        await until(lambda: db.fetchval("SELECT finished_at IS NOT NULL FROM agent.sync_runs WHERE id = $1", run),
                    timeout=20, what="the run finished")
    row = await db.fetchrow("SELECT r.checked, r.in_sync, d.skipped FROM agent.sync_runs r "
                            "JOIN agent.sync_devices d ON d.run = r.id WHERE r.id = $1", run)
    assert (row["checked"], row["in_sync"], row["skipped"]) == (1, 1, None)


async def test_scheduled_runs_leave_a_device_still_outstanding_to_its_run_and_check_the_others(db, dsn):
    device = ScriptedDriver()
    await setup(db, device)
    await add_device(db, "r2", "scripted")
    await db.execute("INSERT INTO agent.service_state (device, service, desired, observed) VALUES ('r2', 'wifi', "
                     "'on', 'on')")
    async with running_agent(dsn, device, vpn_check_interval=300, reconcile_unreachable_wait=600,
                             reconcile_schedule="1") as agent:
        tunnel_down(agent)  # before the first run, a second after the leader is elected
        await until(lambda: db.fetchval("SELECT count(*) >= 3 FROM agent.sync_runs WHERE kind = 'scheduled' AND "
                                        "finished_at IS NOT NULL"), timeout=20, what="scheduled runs finished")
        device.states[("r2", "wifi")] = "off"  # r2 drifts while r1's run still waits for it
        await until(lambda: db.fetchval("SELECT count(*) > 0 FROM agent.sync_runs WHERE repaired = 1 AND "
                                        "finished_at IS NOT NULL"), timeout=20, what="r2's drift repaired")
    runs = await db.fetch("SELECT r.id, r.finished_at, array_agg(d.device ORDER BY d.device) AS devices "
                          "FROM agent.sync_runs r JOIN agent.sync_devices d ON d.run = r.id "
                          "WHERE r.kind = 'scheduled' GROUP BY r.id ORDER BY r.id")
    assert runs[0]["devices"] == ["r1", "r2"] and runs[0]["finished_at"] is None  # it waits for r1
    assert all(r["devices"] == ["r2"] for r in runs[1:])  # r1 is left to the run that waits for it
    assert sum(r["finished_at"] is not None for r in runs[1:]) >= 3  # and they finish
    assert device.states[("r2", "wifi")] == "on"


async def test_a_sites_agent_logged_in_as_its_sites_role_starts_scheduled_runs(db, dsn):
    device = ScriptedDriver()
    await setup(db, device)
    async with login_role(dsn, "agent_worker_default") as name:
        async with running_agent(as_user(dsn, name), device, reconcile_schedule="1") as agent:
            await until(lambda: agent.leadership.leading, timeout=15, what="the site's leader")
            await until(lambda: db.fetchval("SELECT count(*) > 0 FROM agent.sync_runs WHERE kind = 'scheduled' AND "
                                            "checked = 1 AND finished_at IS NOT NULL"), timeout=20,
                        what="a scheduled run by the site's role")
    who = await db.fetchval("SELECT requested_by FROM agent.sync_runs WHERE kind = 'scheduled' LIMIT 1")
    assert who == f"{name} ({agent.settings.agent_id})"


async def test_a_device_parked_in_a_run_holds_no_place_from_the_others(db, dsn):
    """With one device of a run fed at a time, an unreachable one waiting for its tunnel does not
    keep the next from being fed and checked."""
    device = ScriptedDriver()
    await setup(db, device)
    await add_device(db, "r2", "scripted")
    await db.execute("INSERT INTO agent.service_state (device, service, desired, observed) VALUES ('r2', 'wifi', "
                     "'on', 'on')")
    device.states[("r2", "wifi")] = "off"  # drifted
    async with running_agent(dsn, device, vpn_check_interval=300, reconcile_unreachable_wait=600,
                             reconcile_batch=1) as agent:
        tunnel_down(agent)
        await until(lambda: agent.leadership.leading, timeout=15, what="leader elected")
        run = await db.fetchval("SELECT agent.request_sync('default')")  # r1 is fed first, and parks
        await until(lambda: db.fetchval("SELECT state = 'done' FROM agent.sync_devices WHERE run = $1 AND "
                                        "device = 'r2'", run), timeout=30, what="r2 checked while r1 waits")
        assert await db.fetchval("SELECT state FROM agent.sync_devices WHERE run = $1 AND device = 'r1'", run) == "sent"
    assert device.states[("r2", "wifi")] == "on"
