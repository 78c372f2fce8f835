"""`agentctl db init` and the producer API (agent.enqueue) on a real Postgres."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime, timedelta, timezone

import asyncpg
import pytest

from agent.contract import Command
from agent.db.queries import Queries
from agent.db.schema import SCHEMA_VERSION, check_ready, init_database, migrations
from agent.errors import ConfigError, TransientError
from agent.executor.acceptor import Acceptor
from tests.support.db import add_device


async def test_init_installs_pgmq_from_the_bundled_sql_and_is_idempotent(empty_dsn):
    conn = await asyncpg.connect(empty_dsn)
    try:
        first = await init_database(conn, "device_tasks")
        second = await init_database(conn, "device_tasks")
        assert first["pgmq"] in ("sql", "extension") and second["pgmq"] == "present"
        assert first["migrations_applied"] == [name for _v, name, _sql in migrations()]  # every one, in order
        assert second["migrations_applied"] == []
        assert await conn.fetchval("SELECT max(version) FROM agent.schema_version") == SCHEMA_VERSION
        queues = {r[0] for r in await conn.fetch("SELECT queue_name FROM pgmq.meta")}
        assert queues == {"device_tasks", "device_tasks_dlq"}
        assert await conn.fetchval("SELECT count(*) FROM pgmq.notify_insert_throttle "
                                   "WHERE queue_name = 'device_tasks'") == 1
        await check_ready(conn, "device_tasks")
    finally:
        await conn.close()


async def test_daemon_refuses_a_database_that_was_not_initialised(empty_dsn):
    conn = await asyncpg.connect(empty_dsn)
    try:
        with pytest.raises(ConfigError, match="agentctl db init"):
            await check_ready(conn, "device_tasks")
        await init_database(conn, "device_tasks")
        with pytest.raises(ConfigError, match="other_q"):
            await check_ready(conn, "other_q")
    finally:
        await conn.close()


async def test_enqueue_function_sends_a_contract_message(db):
    await add_device(db, "r1")
    not_after = datetime.now(timezone.utc) + timedelta(hours=1)
    msg_id = await db.fetchval(
        "SELECT agent.enqueue('r1', 'wifi', 'on', request_id => 'pay-1', not_after => $1, meta => '{\"a\":1}')",
        not_after)
    body = json.loads(await db.fetchval('SELECT message::text FROM pgmq."q_device_tasks" WHERE msg_id = $1', msg_id))
    from agent.contract import parse_command

    cmd = parse_command(json.dumps(body))
    assert (cmd.device, cmd.service, cmd.state, cmd.request_id, cmd.meta) == ("r1", "wifi", "on", "pay-1", {"a": 1})
    assert abs((cmd.not_after - not_after).total_seconds()) < 0.001


@pytest.mark.parametrize("call, message", [
    ("agent.enqueue('r1', 'wifi', 'maybe')", "state must be 'on' or 'off'"),
    ("agent.enqueue('r1', 'wifi', NULL)", "state must be 'on' or 'off'"),
    ("agent.enqueue('r1', 'has space', 'on')", "not a valid service key"),
    ("agent.enqueue('r1', 'wifi', 'on', action => 'reboot')", "action must be"),
    ("agent.enqueue('r1', 'wifi', 'on', not_after => now() - interval '1 s')", "already past"),
    ("agent.enqueue('r1', 'wifi', 'on', meta => '[1]')", "meta must be a JSON object"),
    ("agent.enqueue('r1', 'wifi', 'on', queue => 'nope')", "queue 'nope' does not exist"),
    ("agent.enqueue('r1', 'wifi', 'on', request_id => '')", "request_id"),
])
async def test_enqueue_function_rejects_bad_input_with_a_clear_error(db, call, message):
    await add_device(db, "r1")
    with pytest.raises(asyncpg.InvalidParameterValueError, match=message.replace("(", r"\(")):
        await db.fetchval(f"SELECT {call}")
    assert await db.fetchval('SELECT count(*) FROM pgmq."q_device_tasks"') == 0


async def test_events_are_append_only(db):
    await db.execute("INSERT INTO agent.events (kind) VALUES ('verified')")
    with pytest.raises(asyncpg.RaiseError, match="append-only"):
        await db.execute("UPDATE agent.events SET kind = 'failed'")


async def test_acceptance_of_several_versions_of_one_key_keeps_the_first_owner_and_the_newest_accepted(db, dsn):
    """One statement for a whole take: on (pay-1), off (refund-1), pay-1 resent. The resend is a
    duplicate; of the others the newest is in force, and each learns it."""
    def cmd(state: str, rid: str) -> Command:
        return Command(device="r1", service="wifi", state=state, request_id=rid)

    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=1)
    acceptor = Acceptor(pool, Queries("device_tasks"))
    batch = [acceptor.submit(cmd("on", "pay-1"), 11, 11), acceptor.submit(cmd("off", "refund-1"), 12, 12),
             acceptor.submit(cmd("on", "pay-1"), 13, 13)]
    flushing = asyncio.create_task(acceptor.run())
    try:
        results = await asyncio.gather(*batch)
    finally:
        flushing.cancel()
        await pool.close()
    assert acceptor.flushes == 1
    assert results == [(12, 11, False), (12, 12, False), (12, 11, False)]  # (in force, request_id owner, held)
    row = await db.fetchrow("SELECT desired, desired_version, last_request_id FROM agent.service_state")
    assert tuple(row) == ("off", 12, "refund-1")


async def test_takes_submitted_whole_are_answered_in_their_order_in_one_flush_with_single_commands(db, dsn):
    def cmd(service: str, state: str, rid: str | None = None) -> Command:
        return Command(device="r1", service=service, state=state, request_id=rid)

    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=1)
    acceptor = Acceptor(pool, Queries("device_tasks"))
    first = acceptor.submit_take([(cmd("wifi", "on", "pay-1"), 11, 11, False), (cmd("tv", "on"), 12, 12, False)])
    single = acceptor.submit(cmd("wifi", "off"), 13, 13)
    second = acceptor.submit_take([(cmd("voip", "off"), 14, 14, False), (cmd("tv", "off", "pay-1"), 15, 15, False)])
    flushing = asyncio.create_task(acceptor.run())
    try:
        answers = await asyncio.gather(first, single, second)
    finally:
        flushing.cancel()
        await pool.close()
    assert acceptor.flushes == 1
    # wifi: 13 is newer than 11; tv: 15 reuses pay-1 (owned by 11), a duplicate, so 12 stays in force
    assert answers == [[(13, 11, False), (12, None, False)], (13, None, False), [(14, None, False), (12, 11, False)]]


async def test_the_takes_of_one_flush_are_answered_one_after_another(dsn):
    """A take whose device answers at once runs to its end when answered: the next take is answered
    only after the event loop's next pass, so the report writer gets a turn between two takes."""
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=1)
    acceptor = Acceptor(pool, Queries("device_tasks"))
    takes = [acceptor.submit_take([(Command(device="r1", service=f"s{t}{i}", state="on"), 10 * t + i, 10 * t + i,
                                    False) for i in range(3)]) for t in range(1, 4)]
    seen: list[list[bool]] = []
    for take in takes:
        take.add_done_callback(lambda _f: seen.append([t.done() for t in takes]))
    flushing = asyncio.create_task(acceptor.run())
    try:
        await asyncio.wait_for(asyncio.gather(*takes), 10)
    finally:
        flushing.cancel()
        await pool.close()
    assert acceptor.flushes == 1
    assert seen == [[True, False, False], [True, True, False], [True, True, True]]


async def test_a_take_whose_acceptance_cannot_be_written_learns_it_for_each_command(dsn):
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=1)
    acceptor = Acceptor(pool, Queries("missing_queue"))  # its statement fails: the queue's table is not there
    take = acceptor.submit_take([(Command(device="r1", service="wifi", state="on"), 11, 11, False)])
    flushing = asyncio.create_task(acceptor.run())
    try:
        with pytest.raises(TransientError, match="database unavailable"):
            await asyncio.wait_for(take, 10)
    finally:
        flushing.cancel()
        await pool.close()


async def test_a_migration_adds_event_kinds_keeping_every_kind_allowed_before(db):
    await db.execute("SELECT agent.allow_event_kinds('x_first')")
    await db.execute("SELECT agent.allow_event_kinds('x_second')")  # written beside the first: keeps it
    for kind in ("verified", "rerouted", "policy_missing", "x_first", "x_second"):
        await db.execute("INSERT INTO agent.events (kind) VALUES ($1)", kind)
    with pytest.raises(asyncpg.CheckViolationError):
        await db.execute("INSERT INTO agent.events (kind) VALUES ('bogus')")
