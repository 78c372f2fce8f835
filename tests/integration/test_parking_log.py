"""A VPN outage leaves one `parked` event and log line per message and reason, however many times the
message is parked again, also across an agent restart; a new reason is recorded; the parks are
counted in a summary line now and then."""

from __future__ import annotations

import logging
import time

import asyncpg

from agent.executor import parklog
from agent.vpn.guard import Reach
from tests.support.agents import running_agent
from tests.support.db import add_device, archived, events, send
from tests.support.devices import ScriptedDriver
from tests.support.wait import until


async def bounces(db: asyncpg.Connection, msg: int) -> int:
    """Times the message was parked (the report that parks it writes its events in the same statement)."""
    return int(await db.fetchval('SELECT coalesce((headers->>\'bounces\')::int, 0) FROM pgmq."q_device_tasks" '
                                 "WHERE msg_id = $1", msg))


async def visible_now(db: asyncpg.Connection, msg: int) -> None:
    await db.execute('UPDATE pgmq."q_device_tasks" SET vt = clock_timestamp() WHERE msg_id = $1', msg)


async def parked_again(db: asyncpg.Connection, msg: int) -> None:
    """Make the parked message visible now and wait until it is parked once more."""
    before = await bounces(db, msg)
    await visible_now(db, msg)
    async def more() -> bool:
        return await bounces(db, msg) > before

    await until(more, timeout=10, what="parked once more")


async def test_re_parking_for_the_same_reason_records_nothing_new_even_after_a_restart(db, dsn, caplog):
    await add_device(db, "r1")
    device = ScriptedDriver()
    caplog.set_level(logging.INFO, logger="agent.executor")
    outage = "peer_down: site-a: no handshake for 200 s"
    async with running_agent(dsn, device, coalesce=1, poll_interval=0.2) as agent:
        agent.executor.gate = lambda dev: outage
        msg = await send(db, {"device": "r1", "service": "wifi", "state": "on"})
        await until(lambda: bounces(db, msg), what="parked")
        for _ in range(3):
            await parked_again(db, msg)
            outage = "peer_down: site-a: no handshake for 260 s"  # the same reason, in other words
        assert await events(db, msg) == ["parked"]
        assert await db.fetchval('SELECT headers->>\'parked_reason\' FROM pgmq."q_device_tasks" WHERE msg_id = $1',
                                 msg) == "peer_down"
        outage = "paused: firmware upgrade"  # a new reason is recorded
        await parked_again(db, msg)
        assert await events(db, msg) == ["parked", "parked"]
    async with running_agent(dsn, device, coalesce=1, poll_interval=0.2) as agent:  # a restart: the headers tell
        agent.executor.gate = lambda dev: outage
        await parked_again(db, msg)
        assert await events(db, msg) == ["parked", "parked"]
        outage = None
        await visible_now(db, msg)
        await until(lambda: archived(db, msg), timeout=10, what="done once reachable")
    assert await events(db, msg) == ["parked", "parked", "verified"]
    lines = [r for r in caplog.records if getattr(r, "action", "") == "parked" and r.levelno == logging.INFO]
    assert len(lines) == 2  # one per reason; the other parks log at DEBUG


async def test_a_reconcile_waiting_for_its_device_records_one_parked_event(db, dsn):
    await add_device(db, "r1", "scripted")
    await db.execute("INSERT INTO agent.service_state (device, service, desired, observed) VALUES ('r1', 'wifi', "
                     "'on', 'on')")
    async with running_agent(dsn, ScriptedDriver(), poll_interval=0.2, reconcile_unreachable_wait=600) as agent:
        agent.vpn.reach["r1"] = Reach(False, "peer_down: abcdefgh: last handshake 200s ago", "abcdefgh", time.time())
        await until(lambda: agent.leadership.leading, timeout=15, what="leader elected")
        await db.fetchval("SELECT agent.request_sync('default', 'r1')")
        msg = await until(lambda: db.fetchval("SELECT msg_id FROM agent.sync_devices WHERE msg_id IS NOT NULL"),
                          what="the reconcile message sent")
        await until(lambda: bounces(db, msg), timeout=15, what="the reconcile parked")
        for _ in range(2):
            await parked_again(db, msg)
    assert await db.fetchval("SELECT count(*) FROM agent.events WHERE kind = 'parked' AND device = 'r1'") == 1


async def test_the_agent_logs_a_summary_of_its_parked_messages(db, dsn, caplog):
    """The executor counts every park, also those it records nothing for, in the summary line."""
    await add_device(db, "r1")
    caplog.set_level(logging.INFO, logger="agent.executor")
    async with running_agent(dsn, ScriptedDriver(), coalesce=1, poll_interval=0.2) as agent:
        agent.executor.gate = lambda dev: "peer_down: site-a: no handshake for 200 s"
        agent.executor._parked = parklog.ParkSummary(every=0.5)  # a summary due every half second, not 5 minutes
        msg = await send(db, {"device": "r1", "service": "wifi", "state": "on"})
        await until(lambda: bounces(db, msg), what="parked")

        async def summary() -> list[str]:
            await parked_again(db, msg)
            return [r.getMessage() for r in caplog.records if getattr(r, "action", "") == "parked_summary"]

        lines = await until(summary, timeout=20, what="a parked_summary line")
    assert lines[0].startswith("1 message(s) parked for 1 device(s) in the last ") and lines[0].endswith("peer_down 1")
    assert await events(db, msg) == ["parked"]


def test_one_record_per_kind_of_reason():
    assert parklog.reason_code("peer_down: gw-north: handshake 200 s ago") == "peer_down"
    assert parklog.record(None, "peer_down: gw-north: handshake 200 s ago")
    assert not parklog.record("peer_down", "peer_down: gw-north: handshake 260 s ago")
    assert parklog.record("peer_down", "paused: firmware upgrade")
    assert parklog.reason_code("x" * 500) == "x" * parklog.MAX_CODE


def test_the_reason_last_recorded_is_read_from_any_headers():
    assert parklog.last_parked('{"bounces": 3, "parked_reason": "peer_down"}') == "peer_down"
    for headers in (None, "", "[1]", '"text"', "not json", '{"parked_reason": 7}',
                    '{"parked_reason": "' + "x" * 65 + '"}', '{"parked_reason": ""}'):
        assert parklog.last_parked(headers) is None, headers


def test_a_summary_line_at_most_every_few_minutes():
    s = parklog.ParkSummary(every=300)
    assert s.note(1, "r1", "peer_down", now=0) is None
    assert s.note(2, "r2", "peer_down", now=60) is None
    assert s.note(1, "r1", "peer_down", now=120) is None  # the same message again counts once
    line = s.note(3, "r2", "paused", now=300)
    assert line == "3 message(s) parked for 2 device(s) in the last 300 s: peer_down 2, paused 1"
    assert s.note(1, "r1", "peer_down", now=301) is None  # counted anew from here
    assert s.note(1, "r1", "peer_down", now=600) == "1 message(s) parked for 1 device(s) in the last 300 s: peer_down 1"
