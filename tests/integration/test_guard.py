"""The guard's count is shared by every agent of a site and exact when they decide at once."""

from __future__ import annotations

import asyncio

import asyncpg

from agent.contract import Command
from agent.db.queries import Queries
from agent.executor.acceptor import Acceptor, GuardLimits
from tests.support.cluster import as_user, login_role
from tests.support.db import add_device


async def _on(db: asyncpg.Connection, services: int) -> None:
    await add_device(db, "r1", "scripted")
    await db.execute("INSERT INTO agent.service_state (device, service, desired, observed) "
                     "SELECT 'r1', 's' || n, 'on', 'on' FROM generate_series(1, $1) n", services)


async def test_agents_deciding_at_once_admit_exactly_the_limit(db, dsn):
    """Eight agents (each its own pool, logged in as the site's role) accept 50 offs each at once:
    of 400, exactly max(AGENT_GUARD_OFF_MIN 30, 10 % of 500 on) = 50 are accepted, the rest held."""
    await _on(db, 500)
    limits = GuardLimits("default", off_min=30, off_percent=10.0, window=3600.0)
    async with login_role(dsn, "agent_worker_default") as name:
        pools = [await asyncpg.create_pool(as_user(dsn, name), min_size=1, max_size=1) for _ in range(8)]
        acceptors = [Acceptor(p, Queries("device_tasks"), lambda: limits) for p in pools]
        flushing = [asyncio.create_task(a.run()) for a in acceptors]
        try:
            futures = [a.submit(Command(device="r1", service=f"s{i * 50 + j + 1}", state="off"), 1000 + i * 50 + j,
                                1000 + i * 50 + j) for i, a in enumerate(acceptors) for j in range(50)]
            results = await asyncio.gather(*futures)
        finally:
            for t in flushing:
                t.cancel()
            for p in pools:
                await p.close()
    assert sum(held for _v, _r, held in results) == 350
    assert await db.fetchval("SELECT count(*) FROM agent.service_state WHERE desired = 'off'") == 50
    assert await db.fetchval("SELECT count(*) FROM agent.guard_offs WHERE site = 'default'") == 50


async def test_a_restore_or_an_off_already_in_force_is_never_held(db, dsn):
    await _on(db, 200)
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=1)
    acceptor = Acceptor(pool, Queries("device_tasks"), lambda: GuardLimits("default", off_min=0, off_percent=0.0))
    flushing = asyncio.create_task(acceptor.run())
    try:
        await db.execute("UPDATE agent.service_state SET desired = 'off', desired_version = 5 WHERE service = 's1'")
        results = await asyncio.gather(
            acceptor.submit(Command(device="r1", service="s1", state="off"), 10, 10),  # already off: no change
            acceptor.submit(Command(device="r1", service="s2", state="on"), 11, 11),   # a restore
            acceptor.submit(Command(device="r1", service="s3", state="off"), 12, 12))  # a suspension: held
    finally:
        flushing.cancel()
        await pool.close()
    assert [held for _v, _r, held in results] == [False, False, True]
    rows = await db.fetch("SELECT service, desired FROM agent.service_state WHERE service IN ('s1','s2','s3') "
                          "ORDER BY service")
    assert [tuple(r) for r in rows] == [("s1", "off"), ("s2", "on"), ("s3", "on")]


async def test_a_released_command_and_a_lifted_limit_pass(db, dsn):
    await _on(db, 10)
    await db.execute("INSERT INTO agent.guard_sites (site, lifted_until) VALUES ('default', now() + interval '1 hour')")
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=1)
    acceptor = Acceptor(pool, Queries("device_tasks"), lambda: GuardLimits("default", off_min=0, off_percent=0.0))
    flushing = asyncio.create_task(acceptor.run())
    try:
        lifted = await acceptor.accept(Command(device="r1", service="s1", state="off"), 10, 10)
        await db.execute("UPDATE agent.guard_sites SET lifted_until = NULL")
        released = await acceptor.accept(Command(device="r1", service="s2", state="off"), 11, 11, released=True)
        held = await acceptor.accept(Command(device="r1", service="s3", state="off"), 12, 12)
    finally:
        flushing.cancel()
        await pool.close()
    assert (lifted[2], released[2], held[2]) == (False, False, True)
    assert await db.fetchval("SELECT count(*) FROM agent.guard_offs") == 2


async def test_reconciliation_repairs_no_more_suspensions_than_the_guard_allows(db, dsn):
    """A router reset turned 30 suspended services back on: repairing them is turning 30 services
    off, and the guard counts it like commands. With a limit of 10, ten are repaired, twenty are
    left as drift (event `held`) for the operator, for a later run once the limit allows (or is lifted)."""
    from tests.support.agents import running_agent
    from tests.support.devices import BatchDriver
    from tests.support.wait import until

    device = BatchDriver(name="batch")
    await add_device(db, "r1", "batch")
    services = [f"s{i:02}" for i in range(30)]
    await db.executemany("INSERT INTO agent.service_state (device, service, desired, desired_version, observed) "
                         "VALUES ('r1', $1, 'off', 1, 'off')", [(s,) for s in services])
    await db.executemany("INSERT INTO agent.service_state (device, service, desired, observed) "
                         "VALUES ('r1', $1, 'on', 'on')", [(f"x{i:02}",) for i in range(70)])
    for s in [*services, *(f"x{i:02}" for i in range(70))]:
        device.states[("r1", s)] = "on"  # the reset
    async with running_agent(dsn, device, reconcile_pace=0, guard_off_min=10, guard_off_percent=0) as agent:
        await until(lambda: agent.leadership.leading, timeout=15, what="leader elected")
        run = await db.fetchval("SELECT agent.request_sync('default', 'r1')")
        await until(lambda: db.fetchval("SELECT finished_at IS NOT NULL FROM agent.sync_runs WHERE id = $1", run),
                    timeout=20, what="the reconcile run finished")
    found = dict(await db.fetchrow("SELECT drifted, repaired FROM agent.sync_runs WHERE id = $1", run))
    assert found == {"drifted": 30, "repaired": 10}
    assert sum(device.states[("r1", s)] == "off" for s in services) == 10
    assert await db.fetchval("SELECT count(*) FROM agent.events WHERE kind = 'held'") == 20
