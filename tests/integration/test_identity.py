"""One running process per agent id, on a real database: a process registers under its agent id
unless a live one holds it, and two starting at once cannot both win."""

from __future__ import annotations

import asyncio
import os

import asyncpg
import pytest

from agent import __version__
from agent.db.identity import register
from agent.db.queries import Queries
from agent.errors import ConfigError

Q = Queries("device_tasks")
ROW = {"site": "default", "queue": "device_tasks", "host": "gw", "pid": os.getpid(), "version": __version__}


async def start(conn: asyncpg.Connection, instance: str, host_id: str) -> None:
    await register(conn, Q, "gw1", instance, host_id, ROW, stale_after=180)


async def test_a_second_process_under_a_live_agent_id_is_refused_naming_the_first(db):
    await start(db, "first", "gw-a/boot:1/pidns:1")
    with pytest.raises(ConfigError, match=r"'gw1' is in use by a running agent on host gw \(pid \d+"):
        await start(db, "second", "gw-b/boot:2/pidns:1")
    assert await db.fetchval("SELECT instance FROM agent.agents WHERE agent_id = 'gw1'") == "first"


async def test_an_agent_id_whose_holder_stopped_or_went_stale_is_taken(db):
    await start(db, "first", "gw-a/boot:1/pidns:1")
    await db.execute("UPDATE agent.agents SET last_heartbeat = now() - interval '1 hour'")  # crashed long ago
    await start(db, "second", "gw-b/boot:2/pidns:1")
    await db.execute("UPDATE agent.agents SET state = 'stopped'")
    await start(db, "third", "gw-a/boot:1/pidns:1")
    assert await db.fetchval("SELECT instance FROM agent.agents WHERE agent_id = 'gw1'") == "third"


async def test_two_processes_starting_at_once_cannot_both_register(dsn):
    conns = [await asyncpg.connect(dsn) for _ in range(6)]
    try:
        results = await asyncio.gather(*(start(c, f"i{n}", f"host-{n}/boot:{n}/pidns:1")
                                         for n, c in enumerate(conns)), return_exceptions=True)
    finally:
        for c in conns:
            await c.close()
    assert sum(r is None for r in results) == 1
    assert all(isinstance(r, ConfigError) for r in results if r is not None)
