"""Device claims: two agents never operate one device at once.

A lane (the queue of work for one device inside one agent) claims its device before it works
and releases it when it runs dry. A claim is a session-level advisory lock on one dedicated
connection, so a killed agent frees its devices the moment its connection closes. Claims and
releases from all lanes are coalesced, one statement per flush. A device claimed elsewhere is
not waited for: its work goes back to the queue for a moment (a bounce, not an attempt).

If the claims connection is lost, every claim is void (Postgres dropped the locks with it): a
lane re-claims before its next item. An operation already running on the device finishes (it is
bounded by the device timeout); no new one starts without a fresh claim.
"""

from __future__ import annotations

import asyncio
import logging
import random

import asyncpg

log = logging.getLogger("agent.claims")

DEVICE_LOCK_CLASS = 0x61676E74  # 'agnt': advisory lock class of device claims (object id: hashtext(device))
DB_ERRORS = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError)

FLUSH = """
SELECT array(SELECT pg_advisory_unlock($1::integer, hashtext(d)) FROM unnest($3::text[]) d) AS released,
       array(SELECT pg_try_advisory_lock($1::integer, hashtext(d)) FROM unnest($2::text[]) d) AS claimed
"""


class DeviceClaims:
    def __init__(self, dsn: str, agent_id: str) -> None:
        self._dsn = dsn
        self._agent_id = agent_id
        self._conn: asyncpg.Connection | None = None
        self._held: set[str] = set()
        self._claims: list[tuple[str, asyncio.Future[bool]]] = []
        self._releases: list[str] = []
        self._wake = asyncio.Event()

    async def claim(self, device: str) -> bool:
        """True when this agent may operate the device until it releases it."""
        if device in self._held:
            return True
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._claims.append((device, fut))
        self._wake.set()
        return await fut

    def release(self, device: str) -> None:
        if device in self._held:
            self._held.discard(device)
            self._releases.append(device)
            self._wake.set()

    async def run(self) -> None:
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                claims, self._claims = self._claims, []
                releases, self._releases = self._releases, []
                if claims or releases:
                    await self._flush(claims, releases)
        finally:
            for _device, fut in self._claims:
                if not fut.done():
                    fut.set_result(False)
            if self._conn is not None:
                self._conn.terminate()

    async def _flush(self, claims: list[tuple[str, asyncio.Future[bool]]], releases: list[str]) -> None:
        try:
            conn = await self._connection()
            row = await conn.fetchrow(FLUSH, DEVICE_LOCK_CLASS, [d for d, _ in claims], releases, timeout=10)
        except DB_ERRORS as exc:
            self._lost(f"{type(exc).__name__}: {exc}")
            for _device, fut in claims:
                if not fut.done():
                    fut.set_result(False)
            await asyncio.sleep(random.uniform(0.2, 0.5))
            return
        for (device, fut), got in zip(claims, row["claimed"]):
            if got:
                if device in self._held:  # claimed twice in one flush: keep the lock count at one
                    self._releases.append(device)
                    self._wake.set()
                self._held.add(device)
            if not fut.done():
                fut.set_result(bool(got))
            elif got:
                self.release(device)

    async def _connection(self) -> asyncpg.Connection:
        if self._conn is None or self._conn.is_closed():
            if self._conn is not None:
                self._lost("connection closed")
            self._conn = await asyncpg.connect(
                self._dsn, timeout=10, server_settings={"application_name": f"agentd claims {self._agent_id}"[:63]})
            self._conn.add_termination_listener(lambda _c: self._lost("connection closed"))
        return self._conn

    def _lost(self, why: str) -> None:
        if self._held:
            log.warning("device claims lost (%s): %d device(s) will be claimed again before further work",
                        why, len(self._held), extra={"action": "claims_lost"})
        self._held.clear()
        self._releases.clear()
        if self._conn is not None and not self._conn.is_closed():
            self._conn.terminate()
        self._conn = None
