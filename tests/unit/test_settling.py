"""The fence between the Reporter's commits and the consumer's lease extension: report writes go
together (two batches at once), an extension waits for every write in progress and goes alone, and
a write that comes while an extension waits goes after it (the extension is never starved)."""

from __future__ import annotations

import asyncio

from agent.queue.reports import Settling


async def test_writes_share_it_and_an_extension_waits_for_all_of_them_then_goes_alone():
    fence = Settling()
    log: list[str] = []
    release = asyncio.Event()

    async def write(name: str) -> None:
        async with fence.shared():
            log.append(f"{name} in")
            await release.wait()
            log.append(f"{name} out")

    async def extend() -> None:
        async with fence.alone():
            log.append("extend")

    a, b = asyncio.create_task(write("a")), asyncio.create_task(write("b"))
    await asyncio.sleep(0)
    assert log == ["a in", "b in"]  # two commits at once
    ext = asyncio.create_task(extend())
    await asyncio.sleep(0)
    late = asyncio.create_task(write("c"))  # comes while the extension waits: goes after it
    for _ in range(5):
        await asyncio.sleep(0)
    assert log == ["a in", "b in"]
    release.set()
    await asyncio.wait_for(asyncio.gather(a, b, ext, late), 5)
    assert log[:2] == ["a in", "b in"] and set(log[2:4]) == {"a out", "b out"}
    assert log[4:] == ["extend", "c in", "c out"]


async def test_an_extension_cancelled_while_it_waits_lets_the_writes_through_again():
    fence = Settling()
    release = asyncio.Event()

    async def write() -> None:
        async with fence.shared():
            await release.wait()

    async def extend() -> None:
        async with fence.alone():
            pass

    held = asyncio.create_task(write())
    await asyncio.sleep(0)
    waiting = asyncio.create_task(extend())
    await asyncio.sleep(0)
    waiting.cancel()  # e.g. shutdown, while a write holds the fence
    await asyncio.gather(waiting, return_exceptions=True)
    later = asyncio.create_task(write())
    release.set()
    await asyncio.wait_for(asyncio.gather(held, later), 5)  # the later write was not shut out
