"""The connection budget: one session connection per agent (LISTEN and leadership on it), every other
statement through a pool that shrinks when idle; and a leader's statements never outlive the
connection that holds its lock."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from agent.db.leadership import LEADER_LOCK_CLASS, TRY_LOCK, LeaderConnection, Leadership, current_leader
from agent.db.session import Session, SessionLost
from tests.support.agents import running_agent
from tests.support.db import add_device, archived, send
from tests.support.devices import ScriptedDriver
from tests.support.wait import until

BACKENDS = ("SELECT application_name, count(*) AS n FROM pg_stat_activity WHERE datname = current_database() "
            "AND application_name LIKE 'agentd%' GROUP BY 1 ORDER BY 1")


async def backends(db) -> dict[str, int]:
    return {r["application_name"]: r["n"] for r in await db.fetch(BACKENDS)}


async def test_an_agent_holds_one_session_connection_and_its_pool_shrinks_to_one_when_idle(db, dsn):
    for n in range(8):
        await add_device(db, f"r{n}")
    driver = ScriptedDriver(latency={f"r{n}": 0.05 for n in range(8)})
    async with running_agent(dsn, driver, agent_id="gw1", pool_idle_timeout=0.5, reconcile_schedule="60") as agent:
        await until(lambda: agent.leadership.leading, what="the only agent leads its site")
        msgs = [await send(db, {"device": f"r{n % 8}", "service": f"s{n}", "state": "on"}) for n in range(64)]
        busy = await until(lambda: _pool_above_one(db), timeout=10, what="the pool grows under load")
        for msg in msgs:
            await until(lambda m=msg: archived(db, m), timeout=15)
        idle = await until(lambda: _idle_budget(db), timeout=15, what="the pool shrinks back to one connection")
    assert busy["agentd session gw1"] == 1
    assert idle == {"agentd": 1, "agentd session gw1": 1}  # LISTEN and the leader's lock share one connection


async def _pool_above_one(db) -> dict[str, int] | None:
    seen = await backends(db)
    return seen if seen.get("agentd", 0) > 1 else None


async def _idle_budget(db) -> dict[str, int] | None:
    seen = await backends(db)
    return seen if seen.get("agentd") == 1 else None


@contextlib.asynccontextmanager
async def session(dsn: str, name: str = "test", **kw):  # type: ignore[no-untyped-def]
    s = Session(dsn, {}, on_connect=lambda: None, name=f"agentd session {name}", **kw)
    task = asyncio.create_task(s.run())
    try:
        yield s
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        s.restart()


async def test_a_statement_bound_to_a_lost_connection_never_runs_on_the_next(db, dsn):
    """The leader's fencing: its lock went with the old connection, so must its statements."""
    async with session(dsn, check_interval=0.2) as s:
        first = await asyncio.wait_for(s.connection(), 10)
        leader = LeaderConnection(s, first)
        assert await s.fetchval(TRY_LOCK, LEADER_LOCK_CLASS, "site-a", generation=first)
        assert await current_leader(db, "site-a") is not None
        await db.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                         "WHERE application_name = 'agentd session test'")
        second = await until(lambda: _next_generation(s, first), timeout=10, what="reconnected")
        assert second > first
        with pytest.raises(SessionLost):
            await leader.execute("SELECT 1")
        assert await s.fetchval("SELECT 1") == 1  # unbound statements run on the new connection
        assert await current_leader(db, "site-a") is None  # the lock went with the old backend


async def _next_generation(s: Session, old: int) -> int | None:
    return s.generation if s.connected.is_set() and s.generation != old else None


async def test_a_standby_asks_at_its_interval_and_at_once_when_the_leader_steps_down(db, dsn):
    async with session(dsn, "a") as one, session(dsn, "b") as two:
        a, b = Leadership(one, "site-b", check_interval=300), Leadership(two, "site-b", check_interval=300)
        terms: list[str] = []

        async def lead(name: str, _conn: LeaderConnection) -> None:
            terms.append(name)
            await asyncio.Event().wait()

        ta = asyncio.create_task(a.run(lambda c: lead("a", c)))
        await until(lambda: a.leading, what="a leads")
        # b subscribed to `agent_leader`, which its session listens on from its next connection: this one is up
        listening = await asyncio.wait_for(two.connection(), 10)
        await two.listen("agent_leader", b.stepped_down, listening)
        tb = asyncio.create_task(b.run(lambda c: lead("b", c)))
        await until(lambda: db.fetchval("SELECT query LIKE '%pg_try_advisory_lock%' FROM pg_stat_activity "
                                        "WHERE application_name = 'agentd session b'"), what="b asked once")
        assert not b.leading
        await a.stop(ta)  # steps down: unlock and notify
        await until(lambda: b.leading, timeout=5, what="b takes over at once, not after 300 s")
        assert terms == ["a", "b"]
        tb.cancel()
        await asyncio.gather(tb, return_exceptions=True)
