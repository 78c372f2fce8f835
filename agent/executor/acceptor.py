"""Write-ahead of intent: a command's desired state is committed before any device is touched.

This makes the database, not a process's memory, the judge of "newest command wins": after a
crash, or with another replica on the queue, an older command can never be applied over a newer
one that was already accepted. Acceptances from all lanes are group-committed, one transaction
per flush.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

from agent.contract import Command
from agent.db.connect import DB_ERRORS
from agent.db.queries import Queries
from agent.errors import TransientError
from agent.text import strict_json

Accepted = tuple[int, int | None, bool]  # (version in force, version owning the request_id, held by the guard)


@dataclass(frozen=True)
class GuardLimits:
    """The guard against mass suspension (AGENT_GUARD_*), as the acceptance statement takes it."""

    site: str
    off_min: int = 100
    off_percent: float = 10.0
    window: float = 3600.0

    def args(self) -> tuple[str, int | None, float, float]:
        """$2..$5 of `accept`: off_min NULL turns the guard off (percent 100)."""
        return self.site, (self.off_min if self.off_percent < 100 else None), self.off_percent, self.window


_NO_GUARD = GuardLimits("default", off_percent=100.0)


@dataclass
class _Pending:
    command: Command
    version: int
    msg_id: int
    done: asyncio.Future[Any]  # Accepted; a take's: the list of its commands' Accepted (`at`: the place in it)
    released: bool = False
    at: int = -1


class Acceptor:
    def __init__(self, pool: asyncpg.Pool, queries: Queries, guard: Callable[[], GuardLimits] | None = None) -> None:
        self._pool = pool
        self._q = queries
        self.guard = guard or (lambda: _NO_GUARD)  # live settings: asked at each flush
        self._pending: list[_Pending] = []
        self._urgent: list[_Pending] = []
        self._wake = asyncio.Event()
        self.flushes = 0

    def submit(self, command: Command, version: int, msg_id: int, released: bool = False,
               urgent: bool = False) -> asyncio.Future[Accepted]:
        """A future of (version in force for the key, version owning the request_id or None, held).
        held: the guard against mass suspension holds this `off` (it was not accepted); `released`:
        an operator released it, the guard lets it pass.

        The caller may read the device meanwhile; it must not write before the future resolves.
        `urgent` (a high-priority command): flushed in a statement of its own, ahead of the others
        waiting, so a restore's acceptance does not wait for a burst's.
        """
        fut: asyncio.Future[Accepted] = asyncio.get_running_loop().create_future()
        self._enqueue([_Pending(command, version, msg_id, fut, released)], urgent)
        return fut

    def submit_take(self, commands: Sequence[tuple[Command, int, int, bool]],
                    urgent: bool = False) -> asyncio.Future[list[Accepted]]:
        """`submit` for the commands of one take at once, (command, version, msg_id, released) each: one
        future of their answers in the same order (a month-end take is a hundred commands: a future
        each, and an await each, was a share of the agent's CPU)."""
        fut: asyncio.Future[list[Accepted]] = asyncio.get_running_loop().create_future()
        self._enqueue([_Pending(c, version, msg_id, fut, released, i)
                       for i, (c, version, msg_id, released) in enumerate(commands)], urgent)
        return fut

    def _enqueue(self, items: list[_Pending], urgent: bool) -> None:
        (self._urgent if urgent else self._pending).extend(items)
        self._wake.set()

    async def accept(self, command: Command, version: int, msg_id: int, released: bool = False) -> Accepted:
        return await self.submit(command, version, msg_id, released)

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._urgent:
                batch, self._urgent = self._urgent, []
                self._wake.set()  # the others next
            else:
                batch, self._pending = self._pending, []
            if not batch:
                continue
            self.flushes += 1
            try:
                async with self._pool.acquire() as conn:
                    results = await self._write(conn, batch)
            except DB_ERRORS as exc:
                for p in batch:
                    if not p.done.done():
                        p.done.set_exception(TransientError(f"database unavailable: {exc}"))
                continue
            takes: dict[int, list[Accepted]] = {}  # a take's answers, in its order (its items came in order)
            for p, result in zip(batch, results):
                if p.at >= 0:
                    takes.setdefault(id(p.done), []).append(result)
                elif not p.done.done():
                    p.done.set_result(result)
            await self._answer([p for p in batch if p.at == 0], takes)

    @staticmethod
    async def _answer(firsts: list[_Pending], takes: dict[int, list[Accepted]]) -> None:
        """The takes of one flush are answered one after another, with a pass of the event loop
        between two: a take whose device answers at once runs to its end when answered, so answered
        together the takes of a month-end flush (thirty of a hundred commands) all ran before the first
        outcome could be reported, and Postgres sat idle for that long. Every take is answered, also
        when this is cancelled."""
        try:
            for i, p in enumerate(firsts):
                if i:
                    await asyncio.sleep(0)
                if not p.done.done():
                    p.done.set_result(takes[id(p.done)])
        finally:
            for p in firsts:
                if not p.done.done():
                    p.done.set_result(takes[id(p.done)])

    async def _write(self, conn: asyncpg.Connection, batch: list[_Pending]) -> list[Accepted]:
        # one JSON array of columns: plain lists are what JSON encodes fastest (see reports.py, _columns)
        commands = [p.command for p in batch]
        columns = strict_json([[c.device for c in commands], [c.service for c in commands],
                              [c.state for c in commands], [p.version for p in batch], [p.msg_id for p in batch],
                              [c.request_id for c in commands], [p.released for p in batch]])
        owners: dict[str, int] = {}
        versions: dict[tuple[str, str], int] = {}
        held: dict[tuple[str, str], int] = {}
        for r in await conn.fetch(self._q.accept, columns, *self.guard().args()):
            if r["kind"] == "r":
                owners[r["a"]] = r["version"]
            else:
                versions[(r["a"], r["b"])] = r["version"]
                if r["kind"] == "h":
                    held[(r["a"], r["b"])] = r["held"]
        out: list[Accepted] = []
        for p in batch:
            key = (p.command.device, p.command.service)
            out.append((versions.get(key, 0), owners.get(p.command.request_id) if p.command.request_id else None,
                        held.get(key) == p.version))
        return out
