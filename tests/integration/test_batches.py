"""A billing job follows its batch, logged in as a member of agent_producer only: agent.enqueue
carries the batch (and the priority) in the message's headers, agent.batch_status(name) counts the
batch's commands by outcome, and LISTEN agent_batch says when none of them is pending any more."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from agent.db.queries import Queries
from agent.db.schema import init_database
from agent.errors import PermanentError
from agent.ops import admin
from tests.support.agents import agentctl, running_agent
from tests.support.cluster import as_user, connected_as, listening, login_role
from tests.support.db import add_device
from tests.support.devices import ScriptedDriver
from tests.support.wait import until

BATCH = "suspend-2026-12"


@pytest.fixture
async def producer(dsn: str, db: asyncpg.Connection) -> AsyncIterator[asyncpg.Connection]:
    await add_device(db, "r1")
    async with connected_as(dsn, "agent_producer") as conn:
        yield conn


@pytest.fixture
async def announced(dsn: str, producer: asyncpg.Connection) -> AsyncIterator[list[dict[str, Any]]]:
    """What LISTEN agent_batch delivered (to the producer's role, on a connection of its own)."""
    async with listening(dsn, producer, "agent_batch") as payloads:
        yield payloads


async def enqueue(conn: asyncpg.Connection, service: str, state: str | None = "on", **kw: Any) -> int:
    args = ", ".join(f"{k} => ${i}" for i, k in enumerate(kw, start=4))
    return await conn.fetchval(f"SELECT agent.enqueue($1, $2, $3{', ' + args if args else ''})",
                               "r1", service, state, *kw.values())


async def batch_status(conn: asyncpg.Connection, name: str = BATCH) -> dict[str, Any]:
    row = await conn.fetchrow("SELECT * FROM agent.batch_status($1)", name)
    return dict(row) if row else {}


def counts(st: dict[str, Any]) -> dict[str, int]:
    return {k: st[k] for k in ("total", "verified", "superseded", "failed", "held", "discarded", "duplicate",
                               "expired", "pending")}


async def headers(db: asyncpg.Connection, msg_id: int) -> dict[str, Any]:
    return json.loads(await db.fetchval("SELECT headers::text FROM pgmq.q_device_tasks WHERE msg_id = $1", msg_id))


async def test_a_restore_is_high_priority_by_default_and_the_rest_normal(producer, db):
    restore = await enqueue(producer, "wifi", "on")
    suspend = await enqueue(producer, "lan", "off")
    refresh = await enqueue(producer, "port-1", None, action="refresh")
    slow_restore = await enqueue(producer, "port-2", "on", priority="normal")
    urgent_suspend = await enqueue(producer, "port-3", "off", priority="high", batch=BATCH)
    old_call = await producer.fetchval("SELECT agent.enqueue('r1', 'port-4', 'on', NULL, NULL, NULL, 'set', 0, NULL)")
    assert await headers(db, restore) == {"priority": "high"}
    assert await headers(db, suspend) == {"priority": "normal"}
    assert await headers(db, refresh) == {"priority": "normal"}
    assert await headers(db, slow_restore) == {"priority": "normal"}
    assert await headers(db, urgent_suspend) == {"priority": "high", "batch": BATCH}
    assert await headers(db, old_call) == {"priority": "high"}  # a call of the old signature still works
    assert await db.fetchval("SELECT count(*) FROM pg_proc WHERE oid::regprocedure::text LIKE 'agent.enqueue(%'") == 1


@pytest.mark.parametrize("args, message", [
    ({"priority": "urgent"}, "priority must be 'high' or 'normal'"),
    ({"priority": ""}, "priority must be 'high' or 'normal'"),
    ({"batch": ""}, "not a valid batch name"),
    ({"batch": "month end"}, "not a valid batch name"),
    ({"batch": "x" * 101}, "not a valid batch name"),
    ({"batch": "bad\nname"}, "not a valid batch name"),
])
async def test_enqueue_refuses_a_bad_priority_or_batch_name_with_22023(producer, db, args, message):
    with pytest.raises(asyncpg.InvalidParameterValueError, match=message):  # SQLSTATE 22023: fix the call
        await enqueue(producer, "wifi", **args)
    assert await db.fetchval("SELECT count(*) FROM pgmq.q_device_tasks") == 0
    assert await db.fetchval("SELECT count(*) FROM agent.batches") == 0


async def test_a_batch_is_counted_through_every_outcome_and_announced_when_nothing_is_pending(
        producer, announced, dsn, db):
    device = ScriptedDriver()
    device.fail("r1", "port-9", PermanentError("the router said 403"))
    verified = await enqueue(producer, "wifi", request_id="pay-1", batch=BATCH)
    duplicate = await enqueue(producer, "lan", request_id="pay-1", batch=BATCH)
    older = await enqueue(producer, "port-1", "off", batch=BATCH)
    newer = await enqueue(producer, "port-1", "on", batch=BATCH)
    dead = await enqueue(producer, "port-9", "on", batch=BATCH)
    await enqueue(producer, "port-3", "off")  # not in the batch
    await enqueue(producer, "port-4", "off", batch="another")
    late = await producer.fetchval("SELECT agent.enqueue('r1', 'port-2', 'on', not_after => now() + interval '1 s', "
                                   "batch => $1)", BATCH)
    queued = await batch_status(producer)
    assert counts(queued) == {"total": 6, "verified": 0, "superseded": 0, "failed": 0, "held": 0, "discarded": 0,
                              "duplicate": 0, "expired": 0, "pending": 6}
    assert queued["first_enqueued_at"] is not None and queued["last_settled_at"] is None
    await until(lambda: db.fetchval("SELECT clock_timestamp() > (message->>'not_after')::timestamptz "
                                    "FROM pgmq.q_device_tasks WHERE msg_id = $1", late), what="not_after passed")
    async with running_agent(dsn, device):
        await until(lambda: [p for p in announced if p["batch"] == BATCH], what="the batch announced")
        await until(lambda: len(announced) == 2, what="the other batch announced too")
    settled = await batch_status(producer)
    assert counts(settled) == {"total": 6, "verified": 2, "superseded": 1, "failed": 1, "held": 0, "discarded": 0,
                               "duplicate": 1, "expired": 1, "pending": 0}
    assert settled["last_settled_at"] >= settled["first_enqueued_at"]
    [payload] = [p for p in announced if p["batch"] == BATCH]
    assert {k: payload[k] for k in counts(settled)} == counts(settled)
    assert payload["first_enqueued_at"].endswith("Z") and payload["last_settled_at"].endswith("Z")
    kinds = dict(await db.fetch("SELECT version, outcome FROM agent.batch_commands WHERE batch = $1", BATCH))
    assert kinds == {verified: "verified", duplicate: "duplicate", older: "superseded", newer: "verified",
                     dead: "dead_lettered", late: "expired"}


async def test_a_replayed_dead_letter_counts_again_once_it_settles(producer, announced, dsn, db):
    device = ScriptedDriver()
    device.fail("r1", "wifi", PermanentError("the router said 403"))  # once: the replay goes through
    await enqueue(producer, "wifi", batch=BATCH)
    async with running_agent(dsn, device):
        await until(lambda: announced, what="the batch announced")
    assert counts(await batch_status(producer))["failed"] == 1
    [dlq_id] = [r["dlq_id"] for r in await admin.dlq_list(db, Queries("device_tasks"))]
    [(_, copy)] = await admin.dlq_replay(db, Queries("device_tasks"), [dlq_id])
    replayed = await headers(db, copy)
    assert (replayed["priority"], replayed["batch"]) == ("high", BATCH)  # a replayed restore still goes first
    async with running_agent(dsn, device):
        await until(lambda: len(announced) == 2, what="the batch announced again")
    assert counts(await batch_status(producer)) == {"total": 1, "verified": 1, "superseded": 0, "failed": 0,
                                                    "held": 0, "discarded": 0, "duplicate": 0, "expired": 0,
                                                    "pending": 0}
    assert [(p["failed"], p["verified"]) for p in announced] == [(1, 0), (0, 1)]


async def test_a_command_moved_to_its_sites_queue_still_counts_in_its_batch(producer, announced, dsn, db):
    north = await asyncpg.connect(dsn)
    try:
        await init_database(north, "site_north", site="north")
    finally:
        await north.close()
    await add_device(db, "n1", site="north")
    msg = await producer.fetchval("SELECT agent.enqueue('n1', 'wifi', 'on', queue => 'device_tasks', batch => $1)",
                                  BATCH)
    async with running_agent(dsn, ScriptedDriver()):  # the default site's agent moves it
        await until(lambda: db.fetchval("SELECT count(*) FROM pgmq.q_site_north WHERE "
                                        "(headers->>'origin_msg_id')::bigint = $1", msg), what="moved to north's queue")
    moved = await db.fetchval("SELECT headers::text FROM pgmq.q_site_north")
    assert (json.loads(moved)["batch"], json.loads(moved)["priority"]) == (BATCH, "high")
    assert counts(await batch_status(producer))["pending"] == 1 and announced == []
    async with running_agent(dsn, ScriptedDriver(), queue="site_north", site="north"):
        await until(lambda: announced, what="the batch announced")
    assert counts(await batch_status(producer)) == {"total": 1, "verified": 1, "superseded": 0, "failed": 0,
                                                    "held": 0, "discarded": 0, "duplicate": 0, "expired": 0,
                                                    "pending": 0}


async def record(conn: asyncpg.Connection, kind: str, version: int) -> None:
    """An event of the command, as an agent records it."""
    await conn.execute("INSERT INTO agent.events (device, service, kind, msg_id, version) "
                       "VALUES ('r1', 's', $1, $2, $2)", kind, version)


async def test_held_and_discarded_commands_count_and_a_held_one_pends_again_when_released(producer, announced, db):
    await db.execute("SELECT agent.allow_event_kinds('held', 'released', 'discarded')")  # the guard's kinds
    held, discarded = await enqueue(producer, "wifi", "off", batch=BATCH), await enqueue(producer, "lan", "off",
                                                                                          batch=BATCH)
    await record(db, "held", held)
    await record(db, "held", discarded)
    assert (await batch_status(producer))["held"] == 2
    await until(lambda: announced, what="announced: nothing pending, the held wait for an operator")
    await record(db, "discarded", discarded)
    await record(db, "released", held)
    st = await batch_status(producer)
    assert (st["held"], st["discarded"], st["pending"]) == (0, 1, 1)
    await record(db, "verified", held)
    assert counts(await batch_status(producer)) == {"total": 2, "verified": 1, "superseded": 0, "failed": 0,
                                                    "held": 0, "discarded": 1, "duplicate": 0, "expired": 0,
                                                    "pending": 0}
    await until(lambda: len(announced) == 3, what="announced after the discard and the verification")
    assert [(p["held"], p["discarded"], p["verified"]) for p in announced] == [(2, 0, 0), (1, 1, 0),
                                                                                        (0, 1, 1)]


async def test_of_two_agents_settling_the_last_two_commands_at_once_one_announces(producer, announced, dsn, db):
    first, second = await enqueue(producer, "wifi", batch=BATCH), await enqueue(producer, "lan", batch=BATCH)
    async with login_role(dsn, "agent_worker") as worker:  # what an agent may do is enough
        a, b = await asyncpg.connect(as_user(dsn, worker)), await asyncpg.connect(as_user(dsn, worker))
        await settle_at_once(a, b, first, second, db)
    await until(lambda: announced, what="the batch announced")
    assert await producer.fetchval("SELECT pending FROM agent.batch_status($1)", BATCH) == 0
    await producer.execute("SELECT pg_notify('agent_batch', '{\"batch\": \"marker\"}')")  # all before it arrived
    await until(lambda: announced[-1]["batch"] == "marker", what="the marker")
    assert [p["batch"] for p in announced] == [BATCH, "marker"]


async def settle_at_once(a: asyncpg.Connection, b: asyncpg.Connection, first: int, second: int,
                         watch: asyncpg.Connection) -> None:
    """`a` settles `first` and `b` `second`, each in a transaction, `b` while `a`'s is still open."""
    try:
        ta, tb = a.transaction(), b.transaction()
        await ta.start()
        await tb.start()
        await record(a, "verified", first)
        settling = asyncio.ensure_future(record(b, "verified", second))  # waits for the batch's row
        await until(lambda: watch.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = $1 AND wait_event_type "
                                           "= 'Lock'", b.get_server_pid()), what="the second waiting for the first")
        await ta.commit()
        await settling
        await tb.commit()
    finally:
        await a.close()
        await b.close()


async def test_an_unknown_batch_has_no_row(producer):
    assert await producer.fetch("SELECT * FROM agent.batch_status('never-sent')") == []


async def test_agentctl_enqueues_into_a_batch_and_shows_it(producer, dsn, db):
    agentctl(dsn, "enqueue", "r1", "wifi", "off", "--batch", BATCH)
    agentctl(dsn, "enqueue", "r1", "lan", "on", "--batch", BATCH, "--priority", "normal")
    sent = await db.fetch("SELECT msg_id FROM pgmq.q_device_tasks ORDER BY msg_id")
    assert [await headers(db, m["msg_id"]) for m in sent] == [{"priority": "normal", "batch": BATCH}] * 2
    text = agentctl(dsn, "batch", "show", BATCH).stdout
    shown_text = dict((k, v.strip()) for k, v in (line.split(":", 1) for line in text.splitlines()))
    assert {k: shown_text[k] for k in ("batch", "total", "pending", "verified", "last settled at")} == \
        {"batch": BATCH, "total": "2", "pending": "2", "verified": "0", "last settled at": "-"}
    shown = json.loads(agentctl(dsn, "batch", "show", BATCH, "--json").stdout)
    assert {k: shown[k] for k in ("batch", "total", "pending", "verified", "last_settled_at")} == \
        {"batch": BATCH, "total": 2, "pending": 2, "verified": 0, "last_settled_at": None}
    assert shown["first_enqueued_at"].endswith("Z") or shown["first_enqueued_at"].endswith("+00:00")
    unknown = agentctl(dsn, "batch", "show", "never-sent", check=False)
    assert unknown.returncode == 4 and "no batch 'never-sent'" in unknown.stderr  # not found, as for any command
    refused = agentctl(dsn, "enqueue", "r1", "wifi", "on", "--batch", "month end", check=False)
    assert refused.returncode != 0 and "not a valid batch name" in refused.stderr


def test_a_replay_keeps_only_the_enqueue_headers_agent_enqueue_would_accept():
    assert admin.enqueue_headers('{"priority": "normal", "batch": "b-1", "reason": "x"}') == \
        {"priority": "normal", "batch": "b-1"}
    assert admin.enqueue_headers('{"priority": "urgent", "batch": "a b"}') == {}
    assert admin.enqueue_headers('{"priority": 1, "batch": ["x"]}') == {}
    assert admin.enqueue_headers("[1]") == admin.enqueue_headers(None) == {}
