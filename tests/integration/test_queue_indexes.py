"""A read updates its messages in place: the agent's queues carry no index on vt (PGMQ makes one; no
statement of the agent needs it), so setting vt at a read is a HOT update, and the guard finds its
held commands through a partial index instead. db init and the migration both leave a queue so."""

from __future__ import annotations

import json

import asyncpg

from agent.db import schema
from agent.db.queries import Queries, as_text
from agent.db.schema import init_database, install_pgmq
from tests.support.db import add_device

Q = Queries("device_tasks")


async def indexes(db: asyncpg.Connection, table: str = "q_device_tasks") -> set[str]:
    return {r["indexname"] for r in await db.fetch(
        "SELECT indexname FROM pg_indexes WHERE schemaname = 'pgmq' AND tablename = $1", table)}


async def test_db_init_leaves_the_queue_without_pgmqs_vt_index_and_with_one_for_held_commands(db):
    assert await indexes(db) == {"q_device_tasks_pkey", "q_device_tasks_device_idx", "q_device_tasks_high_idx",
                                 "q_device_tasks_held_idx"}
    await init_database(db, "device_tasks")  # again, as an upgrade does: pgmq.create makes the vt index anew
    assert "q_device_tasks_vt_idx" not in await indexes(db)
    assert "q_device_tasks_dlq_vt_idx" in await indexes(db, "q_device_tasks_dlq")  # the DLQ is PGMQ's as made
    assert await index_kind(db, "archived_at_idx_device_tasks") == "brin"  # kept under PGMQ's name, as a BRIN


async def index_kind(db: asyncpg.Connection, name: str) -> str | None:
    return await db.fetchval("SELECT am.amname FROM pg_class c JOIN pg_am am ON am.oid = c.relam "
                             "WHERE c.oid = to_regclass('pgmq.' || quote_ident($1))", name)


async def test_a_read_updates_its_messages_in_place(db):
    await add_device(db, "r1", "sim")
    bodies = [json.dumps({"device": "r1", "service": f"s{i}", "state": "on" if i % 2 else "off"}) for i in range(40)]
    await db.execute("SELECT pgmq.send_batch('device_tasks', $1::jsonb[])", bodies)
    async with db.transaction():  # eight fit in the room fillfactor 70 leaves on their page
        taken = await db.fetch(Q.read, Q.queue, 30, 8, 65536)
        row = await db.fetchrow("SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_xact_user_tables "
                                "WHERE schemaname = 'pgmq' AND relname = 'q_device_tasks'")
    assert len(taken) == 8
    assert row["n_tup_upd"] == 8 and row["n_tup_hot_upd"] == 8  # not one index entry written for them


async def test_the_guard_finds_held_commands_through_their_index(db):
    await add_device(db, "r1", "sim")
    await db.execute("SELECT pgmq.send_batch('device_tasks', $1::jsonb[])",
                     [json.dumps({"device": "r1", "service": f"s{i}", "state": "off"}) for i in range(300)])
    await db.execute("UPDATE pgmq.q_device_tasks SET vt = clock_timestamp() + interval '100 years', "
                     "headers = '{\"guard\": \"held\"}' WHERE msg_id % 100 = 0")
    await db.execute("ANALYZE pgmq.q_device_tasks")
    plan = "\n".join(r[0] for r in await db.fetch("EXPLAIN " + Q.guard_held))
    assert "q_device_tasks_held_idx" in plan
    stats = await db.fetchrow(Q.queue_stats, 10_000)
    assert stats["held"] == 3 and stats["depth"] == 300


async def test_the_migration_moves_the_queues_of_every_site_to_the_held_index(empty_dsn):
    conn = await asyncpg.connect(empty_dsn)
    try:
        await install_pgmq(conn)
        await schema._migrate(conn, upto=17)
        for queue in ("device_tasks", "site_north"):
            await conn.execute("SELECT pgmq.create($1)", queue)
        await conn.execute("INSERT INTO agent.sites (name, queue) VALUES ('default', 'device_tasks'), "
                           "('north', 'site_north')")
        assert "q_site_north_vt_idx" in await indexes(conn, "q_site_north")
        assert await index_kind(conn, "archived_at_idx_site_north") == "btree"
        await schema._migrate(conn)
        for queue in ("device_tasks", "site_north"):
            found = await indexes(conn, f"q_{queue}")
            assert f"q_{queue}_vt_idx" not in found and f"q_{queue}_held_idx" in found, found
            assert await index_kind(conn, f"archived_at_idx_{queue}") == "brin"
    finally:
        await conn.close()


async def test_reads_are_planned_once_per_connection_not_at_every_read(db):
    """A drain reads hundreds of times: after PostgreSQL's five trial plans the reads run on one
    generic plan (their limits are not visible to the planner, so no custom plan looks cheaper)."""
    await add_device(db, "r1", "sim")
    await db.execute("SELECT pgmq.send_batch('device_tasks', $1::jsonb[])",
                     [json.dumps({"device": "r1", "service": f"s{i}", "state": "on"}) for i in range(20000)])
    await db.execute("ANALYZE pgmq.q_device_tasks")  # a month-end backlog: a visible limit looks far cheaper
    for room in (100, 90, 100, 80, 100, 90, 100, 80):
        await db.fetch(Q.read_devices, 30, ["r1"], as_text([room]), 65536)
        await db.fetch(Q.read, Q.queue, 30, room, 65536)
    plans = {r["statement"]: (r["generic_plans"], r["custom_plans"]) for r in await db.fetch(
        "SELECT statement, generic_plans, custom_plans FROM pg_prepared_statements "
        "WHERE statement LIKE '%FOR UPDATE SKIP LOCKED%' AND statement NOT LIKE '%pg_prepared_statements%'")}
    assert len(plans) == 2 and all(generic >= 3 and custom <= 5 for generic, custom in plans.values()), plans
