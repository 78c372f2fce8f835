"""Least privilege: a producer logged in as a member of agent_producer can enqueue, ask for syncs,
read state and listen, and nothing else; a member of agent_worker can do what agentd needs and no
more. Each test logs in as a fresh LOGIN role (roles are cluster-wide, so names are unique)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import asyncpg
import pytest

from tests.support.cluster import as_user, connected_as, login_role, not_denied
from tests.support.db import add_device, dlq, queue_len

PRODUCER_DENIED = [
    "INSERT INTO pgmq.q_device_tasks (vt, message) VALUES (now(), '{\"device\": \"r1\", \"service\": \"wifi\"}')",
    "SELECT pgmq.send('device_tasks', '{\"device\": \"r1\", \"service\": \"wifi\", \"state\": \"on\"}'::jsonb)",
    "SELECT pgmq.delete('device_tasks', 1::bigint)",
    "SELECT * FROM pgmq.read('device_tasks', 30, 1)",
    "UPDATE agent.service_state SET desired = 'off'",
    "INSERT INTO agent.service_state (device, service, desired) VALUES ('r1', 'lan', 'on')",
    "DELETE FROM agent.service_state",
    "UPDATE agent.devices SET driver = 'http'",
    "INSERT INTO agent.devices (id, driver) VALUES ('r2', 'sim')",
    "DELETE FROM agent.devices",
    "UPDATE agent.events SET error = 'x'",
    "INSERT INTO agent.events (kind) VALUES ('verified')",
    "DELETE FROM agent.events",
    "UPDATE agent.requests SET version = 0",
    "INSERT INTO agent.requests (request_id, version, device, service) VALUES ('x', 1, 'r1', 'wifi')",
    "DELETE FROM agent.requests",
    "SELECT * FROM agent.requests",
]

WORKER_DENIED = [
    "INSERT INTO agent.devices (id, driver) VALUES ('r2', 'sim')",
    "UPDATE agent.devices SET driver = 'http'",
    "DROP TABLE pgmq.q_device_tasks",
    "ALTER TABLE pgmq.q_device_tasks ADD COLUMN x integer",
    "SELECT pgmq.create('x')",
]


@pytest.fixture
async def r1(db: asyncpg.Connection) -> None:
    await add_device(db, "r1", driver="sim")


@pytest.fixture
async def producer(dsn: str, r1: None) -> AsyncIterator[asyncpg.Connection]:
    async with connected_as(dsn, "agent_producer") as conn:
        yield conn


@pytest.fixture
async def worker(dsn: str, r1: None) -> AsyncIterator[asyncpg.Connection]:
    async with connected_as(dsn, "agent_worker") as conn:
        yield conn


async def test_db_init_creates_the_nologin_group_roles(db):
    rows = await db.fetch("SELECT rolname, rolcanlogin FROM pg_roles "
                          "WHERE rolname IN ('agent_producer', 'agent_worker') ORDER BY rolname")
    assert [(r["rolname"], r["rolcanlogin"]) for r in rows] == [("agent_producer", False), ("agent_worker", False)]


async def test_producer_may_enqueue_ask_for_syncs_read_state_and_listen(db, producer):
    heard: asyncio.Queue[str] = asyncio.Queue()
    await producer.add_listener("agent_state", lambda *args: heard.put_nowait(args[3]))
    msg = await producer.fetchval("SELECT agent.enqueue('r1', 'wifi', 'on')")
    assert await db.fetchval("SELECT message->>'state' FROM pgmq.q_device_tasks WHERE msg_id = $1", msg) == "on"
    run = await producer.fetchval("SELECT agent.request_sync('default')")
    requested_by = await db.fetchval("SELECT requested_by FROM agent.sync_runs WHERE id = $1", run)
    assert requested_by == await producer.fetchval("SELECT current_user")
    for table in ("agent.service_state", "agent.events", "agent.devices"):
        await producer.fetch(f"SELECT * FROM {table}")
    await db.execute("INSERT INTO agent.service_state (device, service, desired) VALUES ('r1', 'wifi', 'on')")
    change = json.loads(await asyncio.wait_for(heard.get(), 5))
    assert (change["device"], change["service"], change["desired"]) == ("r1", "wifi", "on")


async def test_producer_has_no_access_to_pgmq_and_writes_nothing_in_agent(db, producer):
    assert await not_denied(producer, PRODUCER_DENIED) == []
    assert await queue_len(db) == 0


async def test_worker_may_read_the_queue_report_and_reenable_notifications(db, worker):
    msg = await db.fetchval("SELECT agent.enqueue('r1', 'wifi', 'on')")
    [row] = await worker.fetch("SELECT * FROM pgmq.read('device_tasks', 30, 1)")
    assert row["msg_id"] == msg
    await worker.execute("INSERT INTO agent.events (kind, device, service, msg_id) "
                         "VALUES ('verified', 'r1', 'wifi', $1)", msg)
    upsert = ("INSERT INTO agent.service_state (device, service, desired, observed) VALUES ('r1', 'wifi', 'on', $1) "
              "ON CONFLICT (device, service) DO UPDATE SET observed = EXCLUDED.observed")
    await worker.execute(upsert, "off")
    await worker.execute(upsert, "on")
    assert await db.fetchval("SELECT observed FROM agent.service_state WHERE device = 'r1'") == "on"
    assert await worker.fetchval("SELECT agent.ensure_notify('device_tasks', 250)") is False  # already on


async def test_worker_may_not_change_the_inventory_or_the_queue_definitions(db, worker):
    assert await not_denied(worker, WORKER_DENIED) == []
    assert await db.fetchval("SELECT count(*) FROM pgmq.meta WHERE queue_name = 'x'") == 0


@pytest.mark.parametrize(("args", "message"), [
    ("meta => '{\"x\": 1e999}'::jsonb", "too large for a double"),
    ("request_id => E'pay-1\\nforged: line'", "must not contain control characters"),
    ("meta => jsonb_build_object('pad', repeat('x', 70000))", "over the contract's 65536-byte limit"),
    ("queue => 'device_tasks_dlq'", "queue 'device_tasks_dlq' does not exist"),
])
async def test_enqueue_refuses_what_the_agent_could_not_handle(db, producer, args, message):
    with pytest.raises(asyncpg.InvalidParameterValueError, match=message):
        await producer.fetchval(f"SELECT agent.enqueue('r1', 'wifi', 'on', {args})")
    assert await queue_len(db) == 0 and await dlq(db) == []


async def test_db_init_as_the_worker_says_to_run_it_as_the_owner(dsn: str) -> None:
    from tests.support.agents import agentctl

    async with login_role(dsn, "agent_worker") as name:
        refused = agentctl(as_user(dsn, name), "db", "init", check=False)
    assert refused.returncode == 2, refused.stderr
    assert f"db init must run as the database owner, not as '{name}'" in refused.stderr
    assert "agentctl db init --print-sql" in refused.stderr
