"""A reconcile run finishes when its last device is reported, also when the reports of its last two
devices commit at the same moment (two report writers of one agent, or two agents of one site)."""

from __future__ import annotations

import asyncio

import asyncpg

from agent.db.queries import Queries
from agent.model.outcome import Outcome
from agent.queue.admission import delivery
from agent.queue.reports import write_batch
from tests.support.db import add_device, reports_waiting_on_a_lock
from tests.support.wait import until

Q = Queries("device_tasks")


def device_done(d, run: int, device: str) -> Outcome:  # type: ignore[no-untyped-def]
    return Outcome(d, "archive", [], sync={"run": run, "device": device, "items": [], "in_sync": 1, "checked": 1,
                                           "drifted": 0, "repaired": 0, "unreadable": 0, "failed": 0,
                                           "skipped": None}, reconcile=True)


async def test_a_run_whose_last_two_devices_are_reported_at_once_finishes(db, dsn):
    for device in ("r1", "r2"):
        await add_device(db, device, "sim")
        await db.execute("INSERT INTO agent.service_state (device, service, desired) VALUES ($1, 'wifi', 'on')",
                         device)
    run = await db.fetchval("SELECT agent.request_sync('default')")
    assert len(await db.fetch(Q.feed_sync, "default", Q.queue, 10, 10)) == 2
    first, second = [delivery(r) for r in await db.fetch(Q.read, Q.queue, 30, 10, 65536)]
    a, b = await asyncpg.connect(dsn), await asyncpg.connect(dsn)
    try:
        commit_a = a.transaction()
        await commit_a.start()
        await write_batch(a, Q, "writer-a", [device_done(first, run, "r1")])  # not committed yet
        reporting_b = asyncio.create_task(write_batch(b, Q, "writer-b", [device_done(second, run, "r2")]))
        await until(lambda: reports_waiting_on_a_lock(db), what="the second report waiting")
        await commit_a.commit()
        await asyncio.wait_for(reporting_b, 10)
    finally:
        await a.close()
        await b.close()
    row = await db.fetchrow("SELECT checked, finished_at FROM agent.sync_runs WHERE id = $1", run)
    assert row["checked"] == 2 and row["finished_at"] is not None
