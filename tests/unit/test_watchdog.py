"""When WATCHDOG=1 is withheld: only when work waits and nothing has moved for AGENT_WATCHDOG_STALL."""

from __future__ import annotations

import asyncio
import time

from agent.runtime.watchdog import stalled
from tests.support.house import Parts, Told, housekeeper, live
from tests.support.wait import until

STALL = 60.0


def test_an_idle_agent_is_never_stalled_however_long_it_waits():
    assert not stalled(now=10_000.0, last_progress=0.0, work_waits=False, stall=STALL)


def test_a_backlog_that_keeps_moving_is_not_stalled_however_long_it_lasts():
    # a read, a dispatch or an outcome a moment ago, hours into the burst
    assert not stalled(now=10_000.0, last_progress=9_999.5, work_waits=True, stall=STALL)


def test_work_that_nothing_moved_for_the_stall_time_is_stalled():
    assert stalled(now=1_000.0, last_progress=1_000.0 - STALL, work_waits=True, stall=STALL)
    assert stalled(now=1_000.0, last_progress=0.0, work_waits=True, stall=STALL)


def test_work_that_moved_just_within_the_stall_time_is_not_stalled():
    assert not stalled(now=1_000.0, last_progress=1_000.0 - STALL + 0.1, work_waits=True, stall=STALL)


async def test_the_pings_stop_while_stalled_and_resume_once_work_moves(caplog):
    told = Told(watchdog_interval=0.01)
    parts = Parts()
    parts.consumer_now(last_progress=time.monotonic() - 2 * STALL, work_waits=True, inflight=1)
    task = asyncio.create_task(housekeeper(parts, told, live(watchdog_stall=STALL)).watch())
    try:
        await until(lambda: "watchdog not fed" in caplog.text, timeout=5, what="the stall logged")
        assert told.pings == 0
        parts.consumer_now(last_progress=time.monotonic())  # an outcome was committed
        await until(lambda: told.pings, timeout=5, what="pings again")
    finally:
        task.cancel()
