"""Restores first, at the queue: the agent's reads take visible high-priority messages before the
others (the `priority` header, else `on` is high), with pgmq.read's effects on the row."""

from __future__ import annotations

import asyncpg

from agent.db.queries import Queries, as_text
from tests.support.db import send

Q = Queries("device_tasks")


async def test_a_read_takes_high_priority_messages_first_and_returns_them_in_msg_id_order(db: asyncpg.Connection):
    offs = [await send(db, {"device": "r1", "service": f"s{i}", "state": "off"}) for i in range(5)]
    restore = await send(db, {"device": "r1", "service": "s9", "state": "on"})  # no header: `on` is high
    urgent_off = await send(db, {"device": "r1", "service": "s8", "state": "off"}, headers={"priority": "high"})
    plain_on = await send(db, {"device": "r1", "service": "s7", "state": "on"}, headers={"priority": "normal"})
    rows = await db.fetch(Q.read, Q.queue, 30, 3, 65536)
    assert [r["msg_id"] for r in rows] == [offs[0], restore, urgent_off]
    again = await db.fetch(Q.read, Q.queue, 30, 10, 65536)
    assert [r["msg_id"] for r in again] == [*offs[1:], plain_on]
    row = await db.fetchrow("SELECT read_ct, vt > now() AS leased, last_read_at IS NOT NULL AS seen "
                            "FROM pgmq.q_device_tasks WHERE msg_id = $1", restore)
    assert tuple(row) == (1, True, True)


async def test_a_device_read_takes_its_high_priority_messages_first(db: asyncpg.Connection):
    offs = [await send(db, {"device": "r1", "service": f"s{i}", "state": "off"}) for i in range(4)]
    await send(db, {"device": "r2", "service": "x", "state": "on"})
    restore = await send(db, {"device": "r1", "service": "s9", "state": "on"})
    rows = await db.fetch(Q.read_devices, 30, ["r1"], as_text([2]), 65536)
    assert [r["msg_id"] for r in rows] == [offs[0], restore]


async def test_one_read_tops_up_several_devices_each_within_its_room_restores_first(db: asyncpg.Connection):
    r1 = [await send(db, {"device": "r1", "service": f"s{i}", "state": "off"}) for i in range(4)]
    r2 = [await send(db, {"device": "r2", "service": f"s{i}", "state": "off"}) for i in range(4)]
    restore = await send(db, {"device": "r2", "service": "s9", "state": "on"})
    other = await send(db, {"device": "r3", "service": "x", "state": "off"})
    rows = await db.fetch(Q.read_devices, 30, ["r1", "r2"], as_text([3, 2]), 65536)
    assert [r["msg_id"] for r in rows] == sorted([*r1[:3], r2[0], restore])  # returned in msg_id order
    rest = await db.fetch(Q.read, Q.queue, 30, 10, 65536)  # what was taken is leased: the rest is left
    assert [r["msg_id"] for r in rest] == [r1[3], *r2[1:], other]


async def test_headers_that_are_not_an_object_read_as_normal(db: asyncpg.Connection):
    first = await send(db, {"device": "r1", "service": "a", "state": "off"})
    odd = await db.fetchval("SELECT pgmq.send('device_tasks', $1::jsonb, '[\"priority\"]'::jsonb)",
                            '{"device": "r1", "service": "b", "state": "off"}')
    restore = await send(db, {"device": "r1", "service": "c", "state": "on"}, headers={"priority": None})
    rows = await db.fetch(Q.read, Q.queue, 30, 10, 65536)
    assert [r["msg_id"] for r in rows] == [first, odd, restore]
    assert [r["msg_id"] for r in await db.fetch(Q.read, Q.queue, 30, 10, 65536)] == []


async def test_the_high_priority_read_uses_the_queues_partial_index(db: asyncpg.Connection):
    await db.execute("SET enable_seqscan = off")
    plan = "\n".join(r[0] for r in await db.fetch(
        "EXPLAIN SELECT msg_id FROM pgmq.q_device_tasks WHERE " + Q.read.split("WHERE ", 1)[1].split(" AND vt", 1)[0]
        + " AND vt <= clock_timestamp() ORDER BY msg_id LIMIT 10"))
    assert "q_device_tasks_high_idx" in plan


async def test_migration_16_builds_the_same_index_on_every_queue_the_sites_record(db: asyncpg.Connection):
    from agent.db.schema import migrations

    made_by_init = await db.fetchval("SELECT pg_get_indexdef('pgmq.q_device_tasks_high_idx'::regclass)")
    await db.execute('DROP INDEX pgmq."q_device_tasks_high_idx"')
    [sql] = [sql for version, _name, sql in migrations() if version == 16]
    await db.execute(sql)
    assert await db.fetchval("SELECT pg_get_indexdef('pgmq.q_device_tasks_high_idx'::regclass)") == made_by_init
