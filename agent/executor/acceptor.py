"""Write-ahead of intent: a command's desired state is committed before any device is touched.

This makes the database, not a process's memory, the judge of "newest command wins": after a
crash, or with another replica on the queue, an older command can never be applied over a newer
one that was already accepted. Acceptances from all lanes are group-committed, one transaction
per flush.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass

import asyncpg

from agent.contract import Command
from agent.db.connect import DB_ERRORS
from agent.db.queries import Queries
from agent.errors import TransientError


@dataclass
class _Pending:
    command: Command
    version: int
    msg_id: int
    done: asyncio.Future[tuple[int, int | None]]


class Acceptor:
    def __init__(self, pool: asyncpg.Pool, queries: Queries) -> None:
        self._pool = pool
        self._q = queries
        self._pending: list[_Pending] = []
        self._urgent: list[_Pending] = []
        self._wake = asyncio.Event()
        self.flushes = 0

    def submit(self, command: Command, version: int, msg_id: int,
               urgent: bool = False) -> asyncio.Future[tuple[int, int | None]]:
        """A future of (version in force for the key, version owning the request_id or None).

        The caller may read the device meanwhile; it must not write before the future resolves.
        `urgent` (a high-priority command): flushed in a statement of its own, ahead of the others
        waiting, so a restore's acceptance does not wait for a burst's.
        """
        fut: asyncio.Future[tuple[int, int | None]] = asyncio.get_running_loop().create_future()
        p = _Pending(command, version, msg_id, fut)
        if urgent:
            self._urgent.append(p)
        else:
            self._pending.append(p)
        self._wake.set()
        return fut

    async def accept(self, command: Command, version: int, msg_id: int) -> tuple[int, int | None]:
        return await self.submit(command, version, msg_id)

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
            for p, result in zip(batch, results):
                if not p.done.done():
                    p.done.set_result(result)

    async def _write(self, conn: asyncpg.Connection, batch: list[_Pending]) -> list[tuple[int, int | None]]:
        rows = json.dumps([{"device": p.command.device, "service": p.command.service, "desired": p.command.state,
                            "version": p.version, "msg_id": p.msg_id, "request_id": p.command.request_id}
                           for p in batch])
        owners: dict[str, int] = {}
        versions: dict[tuple[str, str], int] = {}
        for r in await conn.fetch(self._q.accept, rows):
            if r["kind"] == "r":
                owners[r["a"]] = r["version"]
            else:
                versions[(r["a"], r["b"])] = r["version"]
        return [(versions.get((p.command.device, p.command.service), 0),
                 owners.get(p.command.request_id) if p.command.request_id else None) for p in batch]
