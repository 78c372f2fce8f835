"""Versions compare across queues: every agent queue takes its msg_ids from one sequence
(agent.msg_id_seq), also after an upgrade from a schema where each queue counted for itself, and a
queue made without it is refused until `db init` shares it."""

from __future__ import annotations

import asyncpg
import pytest

from agent.db.schema import check_ready, init_database
from agent.errors import ConfigError
from tests.integration.test_upgrades import pinned_database
from tests.support.db import add_device, send

NORTH = "north_tasks"


async def own_sequence(db: asyncpg.Connection, queue: str) -> int:
    return await db.fetchval("SELECT pg_sequence_last_value(format('pgmq.%I', $1::text)::regclass)",
                             f"q_{queue}_msg_id_seq")


async def test_ids_of_every_agent_queue_follow_one_order(db):
    await init_database(db, NORTH, site="north")
    await add_device(db, "r1")
    await add_device(db, "n1", site="north")
    ids = []
    for device in ("r1", "n1", "r1", "n1"):
        ids.append(await db.fetchval("SELECT agent.enqueue($1, 'wifi', 'on')", device))
    assert ids == sorted(ids) and len(set(ids)) == 4  # one order across device_tasks and north_tasks
    assert await db.fetchval("SELECT last_value FROM agent.msg_id_seq") == ids[-1]
    # the queue's own sequence still counts (pgmq.metrics reads it) and stays above every id given:
    # agents of the previous schema refuse a msg_id above it as forged
    for queue in ("device_tasks", NORTH):
        assert await own_sequence(db, queue) >= ids[-1]
        metrics = await db.fetchrow("SELECT * FROM pgmq.metrics($1)", queue)
        assert metrics["queue_length"] == 2 and metrics["total_messages"] >= ids[-1]


async def test_an_upgraded_database_gives_ids_above_every_version_recorded(empty_dsn):
    await pinned_database(empty_dsn, 7)  # each queue counts for itself
    db = await asyncpg.connect(empty_dsn)
    try:
        await db.execute("SELECT setval('pgmq.q_device_tasks_msg_id_seq', 5000)")
        old = await send(db, {"device": "r1", "service": "wifi", "state": "on"})
        await db.execute("INSERT INTO agent.service_state (device, service, desired, desired_version) "
                         "VALUES ('r1', 'pppoe:bob', 'on', 7000)")  # from a queue since given up
        await init_database(db, "device_tasks")
        await init_database(db, NORTH, site="north")
        await add_device(db, "n1", site="north")
        new = await db.fetchval("SELECT agent.enqueue('n1', 'pppoe:bob', 'off')")
        assert old == 5001 and new > 7000
        assert await db.fetchval("SELECT count(*) FROM pgmq.q_device_tasks WHERE msg_id = 5001") == 1  # kept
        assert await send(db, {"device": "r1"}) > new  # the queue that existed before shares it too
    finally:
        await db.close()


async def test_a_queue_not_sharing_the_ids_is_refused_until_db_init_shares_it(db):
    for name in ("old_q", "old_q_dlq"):  # as an agentctl of the previous release makes a queue
        await db.execute("SELECT pgmq.create($1)", name)
    await db.execute("SELECT setval('pgmq.q_old_q_msg_id_seq', 90000)")  # and used it a while
    with pytest.raises(ConfigError, match="run `agentctl db init` of this release with AGENT_QUEUE=old_q"):
        await check_ready(db, "old_q")
    await init_database(db, "old_q", site="old")
    await check_ready(db, "old_q")
    assert await send(db, {"device": "x"}, queue="old_q") > 90000  # above the ids it gave alone
