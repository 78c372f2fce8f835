"""Write-ahead of intent: a command's desired state is committed before any device is touched.

This makes the database, not a process's memory, the judge of "newest command wins": after a
crash, or with another replica on the queue, an older command can never be applied over a newer
one that was already accepted. Acceptances from all lanes are group-committed, one transaction
per flush.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import asyncpg

from agent.contract import Command
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
        self._wake = asyncio.Event()

    async def accept(self, command: Command, version: int, msg_id: int) -> tuple[int, int | None]:
        """Return (version in force for the key, version owning the request_id or None)."""
        fut: asyncio.Future[tuple[int, int | None]] = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(command, version, msg_id, fut))
        self._wake.set()
        return await fut

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            batch, self._pending = self._pending, []
            if not batch:
                continue
            try:
                async with self._pool.acquire() as conn:
                    results = await self._write(conn, batch)
            except (asyncpg.PostgresError, OSError, asyncpg.InterfaceError, TimeoutError) as exc:
                for p in batch:
                    if not p.done.done():
                        p.done.set_exception(TransientError(f"database unavailable: {exc}"))
                continue
            for p, result in zip(batch, results):
                if not p.done.done():
                    p.done.set_result(result)

    async def _write(self, conn: asyncpg.Connection, batch: list[_Pending]) -> list[tuple[int, int | None]]:
        async with conn.transaction():
            owners: dict[str, int] = {}
            firsts: dict[str, _Pending] = {}
            for p in sorted(batch, key=lambda p: p.version, reverse=True):
                if p.command.request_id:
                    firsts[p.command.request_id] = p  # one row per request_id, the oldest command
            if firsts:
                ps = list(firsts.values())
                rows = await conn.fetch(self._q.accept_requests, list(firsts), [p.version for p in ps],
                                        [p.command.device for p in ps], [p.command.service for p in ps])
                owners = {r["request_id"]: r["version"] for r in rows}
            fresh = [p for p in batch if owners.get(p.command.request_id or "", p.version) == p.version]
            versions: dict[tuple[str, str], int] = {}
            if fresh:
                rows = await conn.fetch(self._q.accept_desired, [p.command.device for p in fresh],
                                        [p.command.service for p in fresh], [p.command.state for p in fresh],
                                        [p.version for p in fresh], [p.msg_id for p in fresh],
                                        [p.command.request_id for p in fresh])
                versions = {(r["device"], r["service"]): r["desired_version"] for r in rows}
        return [(versions.get((p.command.device, p.command.service), 0),
                 owners.get(p.command.request_id) if p.command.request_id else None) for p in batch]
