"""Inventory reloads under a flood of NOTIFYs: any role may send `agent_inventory` with the site's name
as often as it likes; the agent reloads at most once a window, and the last change is never missed."""

from __future__ import annotations

import time

import asyncpg

from agent.inventory.cache import RELOAD_EVERY
from tests.support.agents import running_agent
from tests.support.cluster import as_user, login_role
from tests.support.db import add_device
from tests.support.devices import ScriptedDriver
from tests.support.wait import until


async def test_a_producer_flooding_inventory_notifications_costs_one_reload_a_window_and_the_last_change_lands(
        db, dsn):
    await add_device(db, "r1")
    async with login_role(dsn, "agent_producer") as producer, running_agent(dsn, ScriptedDriver()) as agent:
        await until(lambda: "r1" in agent.inventory.devices, what="the first load")
        loads, load = [], agent.inventory.load

        async def counted() -> None:
            loads.append(time.monotonic())
            await load()
        agent.inventory.load = counted  # type: ignore[method-assign]
        flood = await asyncpg.connect(as_user(dsn, producer))
        try:
            started = time.monotonic()
            for n in range(3000):  # one transaction each: Postgres folds equal NOTIFYs of one transaction
                await flood.execute("SELECT pg_notify('agent_inventory', 'default')")
                if n == 2000:
                    await add_device(db, "late")  # a real change in the middle of the flood
        finally:
            await flood.close()
        await until(lambda: "late" in agent.inventory.devices, what="the change made during the flood")
        elapsed = time.monotonic() - started
        assert len(loads) <= 2 + elapsed / RELOAD_EVERY, f"{len(loads)} reloads in {elapsed:.1f} s"
