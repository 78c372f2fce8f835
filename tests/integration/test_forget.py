"""Retiring a service key (a churned customer): agent.forget, callable by a producer, removes the
state row so reconciliation no longer enforces it, records who did it, and checks what it is given."""

from __future__ import annotations

import json

import asyncpg
import pytest

from tests.support.cluster import as_user, login_role

KEY = ("router-1", "pppoe:alice")


async def known_key(db: asyncpg.Connection) -> None:
    await db.execute("INSERT INTO agent.devices (id, driver) VALUES ('router-1', 'sim')")
    await db.execute("INSERT INTO agent.service_state (device, service, desired, desired_version, observed, "
                     "last_request_id) VALUES ($1, $2, 'on', 17, 'on', 'pay-17'), ($1, 'pppoe:bob', 'on', 18, 'on', "
                     "NULL)", *KEY)


async def test_a_producer_forgets_a_key_and_the_event_says_who_and_what_it_was(db, dsn):
    await known_key(db)
    async with login_role(dsn, "agent_producer") as name:
        producer = await asyncpg.connect(as_user(dsn, name))
        try:
            assert await producer.fetchval("SELECT agent.forget($1, $2, requested_by => 'churn job')", *KEY) is True
            assert await producer.fetchval("SELECT agent.forget($1, $2)", *KEY) is False  # nothing left to forget
        finally:
            await producer.close()
    assert [r["service"] for r in await db.fetch("SELECT service FROM agent.service_state")] == ["pppoe:bob"]
    ev = await db.fetchrow("SELECT * FROM agent.events WHERE kind = 'forgotten'")
    assert (ev["device"], ev["service"], ev["desired"], ev["version"], ev["request_id"]) == (*KEY, "on", 17, "pay-17")
    assert json.loads(ev["meta"])["by"] == f"{name} (churn job)" and ev["error"] == f"forgotten by {name} (churn job)"


async def test_a_forgotten_key_is_no_longer_reconciled(db):
    await known_key(db)
    await db.fetchval("SELECT agent.forget($1, $2)", *KEY)
    run = await db.fetchval("SELECT agent.request_sync(device => 'router-1')")
    assert await db.fetchval("SELECT count(*) FROM agent.sync_devices WHERE run = $1", run) == 1  # bob's still
    await db.fetchval("SELECT agent.forget('router-1', 'pppoe:bob')")
    run = await db.fetchval("SELECT agent.request_sync(device => 'router-1')")
    assert await db.fetchval("SELECT devices FROM agent.sync_runs WHERE id = $1", run) == 0


@pytest.mark.parametrize("args", [
    (None, "pppoe:alice", None), ("router-1", None, None), ("router 1", "pppoe:alice", None),
    ("router-1", "pppoe alice", None), ("router-1", "x" * 201, None), ("router-1", "pppoe:alice", ""),
    ("router-1", "pppoe:alice", "a\nb"), ("router-1", "pppoe:alice", "x" * 201),
])
async def test_what_is_not_a_valid_key_or_label_is_refused(db, args):
    await known_key(db)
    with pytest.raises(asyncpg.InvalidParameterValueError, match=r"agent\.forget: "):
        await db.fetchval("SELECT agent.forget($1, $2, $3)", *args)
    assert await db.fetchval("SELECT count(*) FROM agent.service_state") == 2
