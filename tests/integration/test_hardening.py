"""Hardening at the level each mechanism lives: the Reporter against a real Postgres, the lane's
last resort, state that only moves forward, the lease extension fence."""

from __future__ import annotations

import asyncio
import json
import time

import asyncpg

from agent.db.queries import Queries
from agent.executor.reports import Delivery, EventRow, Outcome, Reporter, StateUpdate, write_batch
from agent.queue.admission import delivery
from tests.support.agents import running_agent
from tests.support.db import add_device, archived, dlq, send, state
from tests.support.devices import ScriptedDriver
from tests.support.wait import until

Q = Queries("device_tasks")


async def read(db: asyncpg.Connection, n: int = 100) -> list[Delivery]:
    rows = await db.fetch(Q.read, Q.queue, 30, n, 65536)
    return [delivery(r) for r in rows]


def verified(d: Delivery, service: str, kind: str = "verified") -> Outcome:
    state = StateUpdate("r1", service, "on", d.version, "on", time.time(), None, time.time(), msg_id=d.msg_id)
    return Outcome(d, "archive", [EventRow(kind, "r1", service, d.msg_id, d.version)], state)


async def test_a_batch_postgres_refuses_is_split_until_the_bad_outcome_stands_alone(db, dsn, pg_admin_dsn):
    ids = [await send(db, {"device": "r1", "service": f"s{i}", "state": "on"}) for i in range(7)]
    deliveries = await read(db)
    bad = 4
    batch = [verified(d, f"s{i}", "no-such-kind" if i == bad else "verified") for i, d in enumerate(deliveries)]
    settled: list[tuple[list[Outcome], set[int]]] = []
    failures: list[str] = []
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    try:
        reporter = Reporter(pool, Q, "test-agent", lambda o, lost: settled.append((o, lost)),
                            on_failed=failures.append)
        task = asyncio.create_task(reporter.run())
        for o in batch:
            reporter.submit(o)
        await asyncio.wait_for(reporter.drained(), 30)
        task.cancel()
    finally:
        await pool.close()
    for i, msg in enumerate(ids):
        assert await archived(db, msg), f"message {i} not recorded"
        if i != bad:
            assert (await state(db, "r1", f"s{i}"))["observed"] == "on"
    assert await state(db, "r1", f"s{bad}") is None  # its refused state report was not written
    [entry] = await dlq(db)
    assert entry["message"]["service"] == f"s{bad}"
    assert "could not be recorded" in entry["headers"]["reason"] and "events_kind_check" in entry["headers"]["reason"]
    assert sum(len(o) for o, _ in settled) == len(ids)
    assert failures and set(failures) == {"refused"}  # counted: pgmq_edge_agent_report_failures_total


async def test_an_outcome_whose_dead_letter_is_refused_too_is_left_for_a_later_delivery(db, dsn):
    [msg] = [await send(db, {"device": "r1", "service": "s", "state": "on"})]
    [d] = await read(db)
    await db.execute('ALTER TABLE pgmq."q_device_tasks_dlq" ADD CONSTRAINT no_entries CHECK (false) NOT VALID')
    settled: list[tuple[list[Outcome], set[int]]] = []
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    try:
        reporter = Reporter(pool, Q, "test-agent", lambda o, lost: settled.append((o, lost)))
        task = asyncio.create_task(reporter.run())
        reporter.submit(verified(d, "s", "no-such-kind"))
        await asyncio.wait_for(reporter.drained(), 30)
        task.cancel()
    finally:
        await pool.close()
    assert not await archived(db, msg)
    assert await db.fetchval('SELECT count(*) FROM pgmq."q_device_tasks" WHERE msg_id = $1', msg) == 1
    assert settled == [(settled[0][0], {msg})]  # given up: its room is freed, nothing else is blocked


async def test_a_late_report_never_moves_state_backwards(db):
    first = await send(db, {"device": "r1", "service": "wifi", "state": "on"})
    second = await send(db, {"device": "r1", "service": "wifi", "state": "off"})
    d1, d2 = await read(db)
    now = time.time()
    newer = Outcome(d2, "archive", [], StateUpdate("r1", "wifi", "off", d2.version, "off", now, now, now,
                                                    msg_id=second, request_id="b"))
    older = Outcome(d1, "retry", [], StateUpdate("r1", "wifi", "on", d1.version, "on", now - 5, None, None,
                                                  error="transient: slow", msg_id=first, request_id="a"),
                    retry_delay=1)
    await write_batch(db, Q, "a", [newer])
    await write_batch(db, Q, "a", [older])  # committed after the newer one
    row = await state(db, "r1", "wifi")
    assert (row["desired"], row["observed"], row["desired_version"]) == ("off", "off", second)
    assert row["last_error"] is None and row["last_request_id"] == "b" and row["last_msg_id"] == second
    assert row["verified_at"].timestamp() == round(now, 6) or abs(row["verified_at"].timestamp() - now) < 1e-3


async def test_a_lane_survives_thousands_of_parks_and_leaves_nothing_leased(db, dsn):
    await add_device(db, "r1")
    device = ScriptedDriver()
    async with running_agent(dsn, device, visibility_timeout=30) as agent:
        agent.executor.gate = lambda _d: "peer_down: test"  # the device is unreachable
        msg = await db.fetchval("SELECT pgmq.send('device_tasks', $1::jsonb, $2::jsonb)",
                                json.dumps({"device": "r1", "service": "wifi", "state": "on"}),
                                json.dumps({"bounces": 5000}))
        await until(lambda: db.fetchval("SELECT (headers->>'bounces')::int = 5001 FROM pgmq.q_device_tasks "
                                         "WHERE msg_id = $1", msg), what="parked once more")
        row = await db.fetchrow("SELECT vt - clock_timestamp() AS wait, (headers->>'bounces')::int AS bounces "
                                "FROM pgmq.q_device_tasks WHERE msg_id = $1", msg)
        assert row["bounces"] == 5001 and 0 < row["wait"].total_seconds() <= 60  # capped backoff, not leased
        await asyncio.wait_for(agent.executor.idle(), 5)  # the lane finished instead of dying
    assert device.calls == []


async def test_a_lease_is_extended_only_for_the_delivery_that_holds_it(db):
    msg = await send(db, {"device": "r1", "service": "wifi", "state": "on"})
    [first] = await read(db)
    await db.execute("UPDATE pgmq.q_device_tasks SET vt = clock_timestamp() WHERE msg_id = $1", msg)
    [second] = await read(db)  # the lease ran out and another reader took the message
    await db.execute(Q.extend_leases, [msg], [first.read_ct], 3600)  # the first holder's late extension
    wait = await db.fetchval("SELECT vt - clock_timestamp() FROM pgmq.q_device_tasks WHERE msg_id = $1", msg)
    assert wait.total_seconds() <= 30 and second.read_ct == first.read_ct + 1
