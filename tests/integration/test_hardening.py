"""Hardening at the level each mechanism lives: the Reporter against a real Postgres, the lane's
last resort, state that only moves forward, the lease extension fence."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import asyncpg

from agent.db.queries import Queries, as_text
from agent.model.outcome import Delivery, EventRow, Outcome, StateUpdate
from agent.queue.admission import delivery
from agent.queue.reports import Reporter, write_batch
from tests.support.agents import running_agent
from tests.support.db import add_device, archived, dlq, reports_waiting_on_a_lock, send, state
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


async def report(dsn: str, outcomes: list[Outcome], *, while_submitted: Any = None,
                 **server_settings: str) -> tuple[list[tuple[list[Outcome], set[int]]], list[str]]:
    """Submit outcomes to a Reporter on its own pool (with these server settings); await
    `while_submitted(failures)` meanwhile, then until every outcome is settled."""
    settled: list[tuple[list[Outcome], set[int]]] = []
    failures: list[str] = []
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2, server_settings=server_settings)
    try:
        reporter = Reporter(pool, Q, "test-agent", lambda o, lost: settled.append((o, lost)),
                            on_failed=failures.append)
        task = asyncio.create_task(reporter.run())
        for o in outcomes:
            reporter.submit(o)
        if while_submitted is not None:
            await while_submitted(failures)
        await asyncio.wait_for(reporter.drained(), 30)
        task.cancel()
    finally:
        await pool.close()
    return settled, failures


async def test_a_report_that_waits_on_a_locked_row_is_recorded_once_the_lock_goes_not_dead_lettered(db, dsn):
    """lock_timeout (as DBAs set it for the agent's role) while an operator's transaction holds one
    state row: the other outcomes of the batch commit, and the blocked one, applied and verified,
    is recorded as such once the lock is released."""
    ids = [await send(db, {"device": "r1", "service": f"s{i}", "state": "on"}) for i in range(3)]
    batch = [verified(d, f"s{i}") for i, d in enumerate(await read(db))]
    await db.execute("INSERT INTO agent.service_state (device, service) VALUES ('r1', 's1')")
    locker = await asyncpg.connect(dsn)
    held = locker.transaction()
    await held.start()
    await locker.execute("SELECT 1 FROM agent.service_state WHERE device = 'r1' AND service = 's1' FOR UPDATE")

    async def then_release(failures: list[str]) -> None:
        try:
            await until(lambda: db.fetchval('SELECT count(*) = 2 FROM pgmq."a_device_tasks" WHERE msg_id = ANY($1)',
                                            [ids[0], ids[2]]),
                        timeout=20, what="the outcomes of the rows not locked recorded")
            assert "unavailable" in failures and not await archived(db, ids[1])
        finally:
            await held.rollback()
            await locker.close()

    settled, failures = await report(dsn, batch, while_submitted=then_release, lock_timeout="100ms")
    assert [await archived(db, i) for i in ids] == [True, True, True]
    assert await dlq(db) == []
    assert (await state(db, "r1", "s1"))["observed"] == "on"
    assert await db.fetchval("SELECT count(*) FROM agent.events WHERE kind = 'verified' AND msg_id = $1", ids[1]) == 1
    assert sum(len(o) for o, lost in settled if not lost) == 3 and "refused" not in failures


async def test_a_report_refused_by_a_read_only_database_is_recorded_once_it_takes_writes(db, dsn, pg_admin_dsn):
    """Mid-failover the pool's connections reach a server that is read-only (SQLSTATE 25006): the
    report waits, on new connections, and lands once writes are taken again."""
    [msg] = [await send(db, {"device": "r1", "service": "s", "state": "on"})]
    [d] = await read(db)
    name = await db.fetchval("SELECT current_database()")
    admin = await asyncpg.connect(pg_admin_dsn)
    await admin.execute(f'ALTER DATABASE "{name}" SET default_transaction_read_only = on')

    async def then_writable(failures: list[str]) -> None:
        try:
            await until(lambda: "unavailable" in failures, timeout=20, what="the report refused as read-only")
        finally:
            await admin.execute(f'ALTER DATABASE "{name}" RESET default_transaction_read_only')
            await admin.close()

    settled, failures = await report(dsn, [verified(d, "s")], while_submitted=then_writable)
    assert await archived(db, msg) and await dlq(db) == []
    assert settled == [(settled[-1][0], set())] and "refused" not in failures


async def test_an_outage_is_one_warning_and_one_line_when_reports_commit_again(db, dsn, pg_admin_dsn, caplog):
    """Every batch retries on its own while the database refuses writes: the first failure is a
    warning, the repeats are DEBUG (a failover must not flood the journal), and the first commit
    after it says so once, with how many lines it quieted."""
    caplog.set_level(logging.DEBUG, logger="agent.reporter")
    msgs = [await send(db, {"device": "r1", "service": f"s{i}", "state": "on"}) for i in range(4)]
    deliveries = await read(db)
    name = await db.fetchval("SELECT current_database()")
    admin = await asyncpg.connect(pg_admin_dsn)
    await admin.execute(f'ALTER DATABASE "{name}" SET default_transaction_read_only = on')

    async def then_writable(failures: list[str]) -> None:
        try:
            await until(lambda: failures.count("unavailable") >= 6, timeout=30, what="several refused writes")
        finally:
            await admin.execute(f'ALTER DATABASE "{name}" RESET default_transaction_read_only')
            await admin.close()

    await report(dsn, [verified(d, f"s{i}") for i, d in enumerate(deliveries)], while_submitted=then_writable)
    assert all([await archived(db, m) for m in msgs])
    trouble = [r for r in caplog.records if getattr(r, "action", "") in ("report_failed", "report_waiting")]
    assert len(trouble) >= 6
    assert [r.levelno for r in trouble if r.levelno >= logging.WARNING] == [logging.WARNING]
    [resumed] = [r for r in caplog.records if getattr(r, "action", "") == "report_resumed"]
    assert resumed.levelno == logging.INFO and resumed.quieted == len(trouble) - 1


async def test_an_outcome_refused_once_for_its_data_is_tried_again_alone_before_a_dead_letter(db, dsn):
    """A data error (class 23) that does not come back on the second try alone is no dead letter."""
    [msg] = [await send(db, {"device": "r1", "service": "s", "state": "on"})]
    [d] = await read(db)
    await db.execute("""
        CREATE SEQUENCE agent.refusals;
        CREATE FUNCTION agent.refuse_once() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF nextval('agent.refusals') = 1 THEN
                RAISE EXCEPTION 'refused once' USING ERRCODE = 'check_violation';
            END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER refuse_once BEFORE INSERT ON agent.events FOR EACH ROW EXECUTE FUNCTION agent.refuse_once();
    """)
    settled, failures = await report(dsn, [verified(d, "s")])
    assert await archived(db, msg) and await dlq(db) == []
    assert failures == ["refused"] and settled == [(settled[0][0], set())]


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


async def test_a_report_keeps_absent_values_null_and_text_as_it_was_escaped(db):
    """The report sends its rows as JSON columns: a value left out (meta, a request_id) stays NULL (not
    JSON null), a time or duration that is not finite is NULL, and text is stored as clean() made it."""
    await send(db, {"device": "r1", "service": "s1", "state": "on"})
    [d] = await read(db)
    ev = EventRow("verified", "r1", "s1", d.msg_id, d.version, None, "on", observed="on", attempt=d.attempt,
                  duration_ms=float("nan"), error='{"not": json}\x00\n')
    upd = StateUpdate("r1", "s1", "on", d.version, "on", float("inf"), None, time.time(), msg_id=d.msg_id,
                      meta={"order": 7, "note": "ü"})
    assert await write_batch(db, Q, "a", [Outcome(d, "archive", [ev], upd)]) == set()
    row = await db.fetchrow("SELECT meta, duration_ms, error, request_id, version, attempt FROM agent.events "
                            "WHERE msg_id = $1", d.msg_id)
    assert row["meta"] is None and row["duration_ms"] is None and row["request_id"] is None
    assert (row["version"], row["attempt"]) == (d.version, d.attempt)
    assert row["error"] == '{"not": json}\\x00\\n'
    st = await state(db, "r1", "s1")
    assert st["observed_at"] is None and st["verified_at"] is not None and st["desired_version"] == d.version
    assert json.loads(st["meta"]) == {"order": 7, "note": "ü"} and st["desired_failed"] is False


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
    # the first holder's late extension
    await db.execute(Q.extend_leases, as_text([msg]), as_text([first.read_ct]), 3600)
    wait = await db.fetchval("SELECT vt - clock_timestamp() FROM pgmq.q_device_tasks WHERE msg_id = $1", msg)
    assert wait.total_seconds() <= 30 and second.read_ct == first.read_ct + 1


async def test_a_report_waiting_on_a_locked_row_holds_up_no_report_after_it(db, dsn):
    """Two report writes at once: while one waits on a state row an operator's transaction holds
    (within lock_timeout), the next batch commits meanwhile instead of queueing behind it."""
    for i in range(2):
        await send(db, {"device": "r1", "service": f"s{i}", "state": "on"})
    first, second = await read(db)
    await db.execute("INSERT INTO agent.service_state (device, service, desired) VALUES ('r1', 's0', 'on')")
    holder = await asyncpg.connect(dsn)
    lock = holder.transaction()
    await lock.start()
    await holder.execute("SELECT 1 FROM agent.service_state WHERE device = 'r1' AND service = 's0' FOR UPDATE")
    settled: list[int] = []
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=3)
    try:
        reporter = Reporter(pool, Q, "test-agent", lambda o, _lost: settled.extend(x.delivery.msg_id for x in o))
        task = asyncio.create_task(reporter.run())
        reporter.submit(verified(first, "s0"))
        await until(lambda: reports_waiting_on_a_lock(db), what="the first report waiting on the lock")
        reporter.submit(verified(second, "s1"))
        await until(lambda: second.msg_id in settled, timeout=10, what="the second report committed meanwhile")
        assert first.msg_id not in settled and await archived(db, second.msg_id)
        await lock.rollback()
        await asyncio.wait_for(reporter.drained(), 30)
        task.cancel()
    finally:
        await holder.close()
        await pool.close()
    assert settled == [second.msg_id, first.msg_id] and await archived(db, first.msg_id)


async def test_a_report_that_only_archives_does_not_wait_for_a_lease_extension(db, dsn):
    """Only a report that leaves messages in the queue (a retry's or a park's new visibility) is fenced
    off from the consumer's lease extension: archiving needs no fence, so a month-end drain's reports
    go on while an extension waits for a fenced write."""
    msg = await send(db, {"device": "r1", "service": "s0", "state": "on"})
    [d] = await read(db)
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    try:
        reporter = Reporter(pool, Q, "test-agent", lambda _o, _lost: None)
        task = asyncio.create_task(reporter.run())
        async with reporter.settling.alone():  # a lease extension under way
            reporter.submit(verified(d, "s0"))
            await until(lambda: archived(db, msg), timeout=10, what="archived meanwhile")
        await asyncio.wait_for(reporter.drained(), 10)
        task.cancel()
    finally:
        await pool.close()
