"""Top-ups read together: the lanes that ask to be filled from the backlog while a top-up read is
under way are read by the next one, and whatever becomes of a read (done, failed, cancelled with the
agent stopping), no lane is left waiting for it."""

from __future__ import annotations

import asyncio
import logging

import pytest

from agent.db.queries import Queries
from agent.queue.consumer import TOP_UP_DEVICES, Consumer
from agent.settings import load_settings


class Reads:
    """Stands in for the statement: records what each read asked for; the first waits for `go`."""

    def __init__(self, fail: bool = False) -> None:
        self.asked: list[dict[str, int]] = []
        self.go = asyncio.Event()
        self.fail = fail

    async def __call__(self, wanted: dict[str, int]) -> None:
        self.asked.append(dict(wanted))
        if len(self.asked) == 1:
            await self.go.wait()
        if self.fail:
            raise RuntimeError("a bug")


def consumer(reads: Reads) -> Consumer:
    settings = load_settings(None, database_url="postgresql://agent@db/agent")
    c = Consumer(None, Queries(settings.queue), settings, None, None, None)  # type: ignore[arg-type]
    c.backlog = True  # a backlog waits: lanes are filled from it
    c._read_devices = reads  # type: ignore[method-assign]
    return c


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_lanes_that_ask_during_a_read_are_read_together_by_the_next_one():
    reads = Reads()
    c = consumer(reads)
    first = asyncio.create_task(c.top_up("r1", 5))
    await settle()
    others = [asyncio.create_task(c.top_up("r2", 3)), asyncio.create_task(c.top_up("r3", 4))]
    await settle()
    assert reads.asked == [{"r1": 5}] and not first.done()
    reads.go.set()
    await asyncio.wait_for(asyncio.gather(first, *others), 5)
    assert reads.asked == [{"r1": 5}, {"r2": 3, "r3": 4}]


async def test_a_read_tops_up_a_few_lanes_the_longest_waiting_first_so_the_first_start_soon():
    reads = Reads()
    c = consumer(reads)
    first = asyncio.create_task(c.top_up("r0", 5))
    await settle()
    waiting = [asyncio.create_task(c.top_up(f"r{n}", n)) for n in range(1, TOP_UP_DEVICES + 3)]
    await settle()
    reads.go.set()
    await asyncio.wait_for(asyncio.gather(first, *waiting), 5)
    assert [list(r) for r in reads.asked] == [
        ["r0"], [f"r{n}" for n in range(1, TOP_UP_DEVICES + 1)], [f"r{n}" for n in range(TOP_UP_DEVICES + 1,
                                                                                        TOP_UP_DEVICES + 3)]]


async def test_nothing_is_read_without_a_backlog():
    reads = Reads()
    c = consumer(reads)
    c.backlog = False
    await asyncio.wait_for(c.top_up("r1", 5), 1)
    assert reads.asked == []


async def test_a_read_cancelled_as_the_agent_stops_leaves_no_lane_waiting():
    reads = Reads()
    c = consumer(reads)
    first = asyncio.create_task(c.top_up("r1", 5))
    await settle()
    second = asyncio.create_task(c.top_up("r2", 3))  # waits for the read after the one under way
    await settle()
    assert c._topping is not None
    c._topping.cancel()
    await asyncio.wait_for(asyncio.gather(first, second), 5)
    assert reads.asked == [{"r1": 5}]


async def test_a_bug_in_a_read_leaves_the_lanes_to_serve_what_they_hold(caplog: pytest.LogCaptureFixture):
    reads = Reads(fail=True)
    reads.go.set()
    c = consumer(reads)
    with caplog.at_level(logging.ERROR, "agent.consumer"):
        await asyncio.wait_for(c.top_up("r1", 5), 5)
    assert "device top-up failed" in caplog.text
    await asyncio.wait_for(c.top_up("r2", 1), 5)  # the next lane is read again
    assert reads.asked == [{"r1": 5}, {"r2": 1}]
