"""Deadlines for device operations, enforced by one sweeper instead of one timer per call.

At thousands of operations a second, arming and cancelling an event-loop timer per device call
is a measurable share of the agent's CPU. Here an operation only writes its deadline into a dict;
a sweeper task wakes every `resolution` seconds and cancels the operations that overran, which
then raise TimeoutError where they were. Deadlines are honoured to within `resolution`.
"""

from __future__ import annotations

import asyncio
from types import TracebackType


class Deadlines:
    def __init__(self, resolution: float = 0.1) -> None:
        self.resolution = resolution
        self._running: dict[asyncio.Task[object], float] = {}
        self._expired: set[asyncio.Task[object]] = set()

    def limit(self, seconds: float) -> _Limit:
        """Within this block the current task is cancelled after `seconds`; that surfaces as TimeoutError."""
        return _Limit(self, seconds)

    def extend(self, seconds: float) -> None:
        """The current task's deadline, if it runs under one, moves `seconds` later (a wait that is
        not the device's time: the device budget's pacing)."""
        task = asyncio.current_task()
        if task in self._running:
            self._running[task] += seconds  # type: ignore[index]

    def expired(self) -> bool:
        """The current task is being cancelled because its deadline passed (not for another reason)."""
        return asyncio.current_task() in self._expired

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.resolution)
            now = loop.time()
            for task, deadline in list(self._running.items()):
                if deadline <= now and task not in self._expired:
                    self._expired.add(task)
                    task.cancel()


class _Limit:
    """One `Deadlines.limit` block: a class, not a generator's context manager, which costs twice as
    much to enter and leave (one block per device call)."""

    __slots__ = ("_deadlines", "_seconds", "_task")

    def __init__(self, deadlines: Deadlines, seconds: float) -> None:
        self._deadlines, self._seconds = deadlines, seconds

    def __enter__(self) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        self._deadlines._running[task] = asyncio.get_running_loop().time() + self._seconds

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        task, deadlines = self._task, self._deadlines
        deadlines._running.pop(task, None)
        if kind is not None and issubclass(kind, asyncio.CancelledError) and task in deadlines._expired:
            deadlines._expired.discard(task)
            task.uncancel()
            raise TimeoutError from None
