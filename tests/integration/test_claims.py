"""Device claims linger a moment after their lane runs dry: a device commanded again soon after
starts at once, without waiting for a claim round trip; then the claim is let go."""

from __future__ import annotations

import asyncio
import contextlib

import asyncpg

from agent.db.queries import Queries
from agent.executor.claims import LINGER, DeviceClaims
from tests.support.wait import until


class CountingPool:
    """The real pool, counting the statements' connections."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self.acquired = 0

    def acquire(self):  # type: ignore[no-untyped-def]
        self.acquired += 1
        return self._pool.acquire()


@contextlib.asynccontextmanager
async def claims(dsn: str, agent_id: str = "a1"):  # type: ignore[no-untyped-def]
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    counting = CountingPool(pool)
    c = DeviceClaims(counting, Queries("device_tasks"), agent_id)  # type: ignore[arg-type]
    task = asyncio.create_task(c.run())
    try:
        yield c, counting
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await pool.close()


async def holder(db: asyncpg.Connection, device: str) -> str | None:
    return await db.fetchval("SELECT agent_id FROM agent.device_claims WHERE device = $1", device)


async def test_a_device_claimed_again_within_the_linger_needs_no_round_trip(db, dsn):
    async with claims(dsn) as (c, pool):
        assert await c.claim("r1", 10.0)
        first = pool.acquired
        c.release("r1")  # the lane ran dry
        assert await c.claim("r1", 10.0)  # the next command, moments later
        assert pool.acquired == first
        assert await holder(db, "r1") == "a1"


async def test_a_released_device_is_let_go_after_the_linger(db, dsn):
    async with claims(dsn) as (c, _pool):
        assert await c.claim("r1", 10.0)
        c.release("r1")
        assert await holder(db, "r1") == "a1"  # still held for the linger
        await until(lambda: _free(db, "r1"), timeout=LINGER + 5, what="the claim let go")
        assert not c.fresh("r1", 0.0)


async def _free(db: asyncpg.Connection, device: str) -> bool:
    return await holder(db, device) is None


async def test_two_processes_with_one_agent_id_never_hold_one_device_together(db, dsn):
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    first = DeviceClaims(pool, Queries("device_tasks"), "gw1", instance="first")
    second = DeviceClaims(pool, Queries("device_tasks"), "gw1", instance="second", host="another-host")
    tasks = [asyncio.create_task(c.run()) for c in (first, second)]
    try:
        assert await first.claim("r1", 10.0)
        assert not await second.claim("r1", 10.0)  # the same agent id is not the same holder
        first.release("r1")
        await until(lambda: _free(db, "r1"), timeout=LINGER + 5, what="the first let go")
        assert await second.claim("r1", 10.0)
        assert await db.fetchval("SELECT instance FROM agent.device_claims WHERE device = 'r1'") == "second"
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await pool.close()
    assert await _free(db, "r1")  # each released its own, at stop
