"""A loop that waits for a wake-up or a timeout stops when it is cancelled, even when the wake-up
comes at the same moment (on Python 3.11 `asyncio.wait_for` then returned normally and the
cancellation was lost: the leader's feed went on after shutdown, and the agent never stopped)."""

from __future__ import annotations

import asyncio
from datetime import datetime, timezone
from typing import Any

import pytest

from agent.db.queries import Queries
from agent.reconcile.reconciler import Reconciler
from agent.reconcile.schedule import parse_schedule


class QuietLeaderConnection:
    """The leader's connection with no run open and nothing to feed."""

    def __init__(self) -> None:
        self.feeds = 0

    async def fetchval(self, sql: str, *args: Any, **kw: Any) -> Any:
        return datetime.now(timezone.utc) if "clock_timestamp" in sql else False

    async def fetch(self, sql: str, *args: Any, **kw: Any) -> list[Any]:
        self.feeds += sql == Queries("device_tasks").feed_sync
        return []


async def test_the_feed_stops_when_cancelled_as_a_notification_wakes_it():
    reconciler = Reconciler(Queries("device_tasks"), "default", "agent-1", parse_schedule("off"), 10, 7)
    conn, kick = QuietLeaderConnection(), asyncio.Event()
    feed = asyncio.create_task(reconciler._feed(conn, kick))  # type: ignore[arg-type]
    for _ in range(1000):
        if conn.feeds:
            break
        await asyncio.sleep(0)
    assert conn.feeds == 1
    for _ in range(3):
        await asyncio.sleep(0)  # now waiting for a kick
    kick.set()    # an `agent_sync` notification ...
    feed.cancel()  # ... as the agent shuts down
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(feed, 5)
