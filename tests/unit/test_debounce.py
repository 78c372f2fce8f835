"""Debounced wake-ups: however many pokes arrive, the action runs at most once per window, and a poke
that arrives while it runs gets one more run after it."""

from __future__ import annotations

import asyncio

from agent.inventory.debounce import Debounced
from tests.support.wait import until


class Action:
    def __init__(self) -> None:
        self.started: list[int] = []  # the number of pokes seen when each run started
        self.release = asyncio.Event()
        self.pokes = 0

    async def __call__(self) -> None:
        self.started.append(self.pokes)
        await self.release.wait()


async def test_the_first_poke_runs_at_once():
    action = Action()
    action.release.set()
    d = Debounced(action, every=3600)
    d.poke()
    await until(lambda: action.started == [0], what="a run without waiting for a window")


async def test_a_flood_of_pokes_during_a_run_coalesces_into_one_more_run_after_the_last():
    action = Action()
    d = Debounced(action, every=0)
    d.poke()
    await until(lambda: action.started, what="the first run")
    for _ in range(10_000):  # the flood, all while the first run is under way
        action.pokes += 1
        d.poke()
        await asyncio.sleep(0)
    action.release.set()
    await until(lambda: not d.busy, what="the runs to finish")
    assert action.started == [0, 10_000] and d.runs == 2
