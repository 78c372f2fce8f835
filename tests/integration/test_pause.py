"""The maintenance switch: a paused device's commands wait, parked, using no attempts, and show why;
resuming sends them on at once."""

from __future__ import annotations

import json

from agent.db.queries import Queries
from agent.ops import admin
from tests.support.agents import running_agent
from tests.support.db import add_device, archived, events, state
from tests.support.devices import ScriptedDriver
from tests.support.wait import until

Q = Queries("device_tasks")


async def test_a_paused_devices_commands_wait_without_attempts_and_go_on_resume(db, dsn):
    await add_device(db, "r1")
    assert await admin.pause_device(db, Q, "r1", "firmware upgrade")
    device = ScriptedDriver()
    async with running_agent(dsn, device, vpn_check_interval=0.2) as agent:
        msg = await db.fetchval(  # parked often before: its next park lasts 30-60 s unless resuming wakes it
            "SELECT pgmq.send('device_tasks', $1::jsonb, $2::jsonb)",
            json.dumps({"device": "r1", "service": "wifi", "state": "on"}), json.dumps({"bounces": 10}))
        await until(lambda: state(db, "r1", "wifi"), what="a state row")
        await until(lambda: db.fetchval("SELECT last_error FROM agent.service_state WHERE device = 'r1'"),
                    what="the reason shown")
        row = await state(db, "r1", "wifi")
        assert row["last_error"] == "parked: paused: firmware upgrade"
        assert device.calls == [] and "parked" in await events(db, msg)
        bounces = await db.fetchval("SELECT (headers->>'bounces')::int FROM pgmq.q_device_tasks WHERE msg_id = $1",
                                    msg)
        assert bounces == 11  # a parked delivery, not an attempt
        assert await admin.resume_device(db, Q, "r1")
        await until(lambda: archived(db, msg), timeout=10, what="done after resume (not at the end of backoff)")
        assert device.states[("r1", "wifi")] == "on"
        attempts = await db.fetch("SELECT attempt FROM agent.events WHERE msg_id = $1 AND kind = 'verified'", msg)
        assert [r["attempt"] for r in attempts] == [1]
        assert agent.inventory.devices["r1"].paused is None


async def test_pausing_an_unknown_device_says_so(db):
    assert not await admin.pause_device(db, Q, "nope", "x")
    assert not await admin.resume_device(db, Q, "nope")


async def test_a_pause_shows_in_the_device_list(db):
    await add_device(db, "r1")
    await admin.pause_device(db, Q, "r1", "cabling")
    assert [d["paused"] for d in await admin.list_devices(db)] == ["cabling"]
    await admin.resume_device(db, Q, "r1")
    assert [d["paused"] for d in await admin.list_devices(db)] == [None]
