"""Coalescing of wake-ups that anyone may send: run an action at most once per window, and never
lose the last request.

A NOTIFY needs no privilege: any role that may log in can send a million of them. What such a
signal starts must therefore cost at most one run per window however many arrive, and a request
that arrives while a run is under way (or waiting for its window) gets one more run after it, so the
result reflects everything asked for up to then.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable


class Debounced:
    """`poke()` runs `action` now if it last started `every` seconds ago or more, else when that window
    ends; pokes meanwhile coalesce into that one run. The action must not raise."""

    def __init__(self, action: Callable[[], Awaitable[None]], every: float) -> None:
        self._action = action
        self.every = every
        self._wanted = False
        self._last = float("-inf")
        self._task: asyncio.Task[None] | None = None
        self.runs = 0

    def poke(self) -> None:
        self._wanted = True
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run())

    @property
    def busy(self) -> bool:
        """A run is under way or waiting for its window."""
        return self._task is not None and not self._task.done()

    async def _run(self) -> None:
        while self._wanted:
            if (wait := self._last + self.every - time.monotonic()) > 0:
                await asyncio.sleep(wait)
            self._wanted = False  # a poke from here on asks for another run
            self._last = time.monotonic()
            self.runs += 1
            await self._action()

