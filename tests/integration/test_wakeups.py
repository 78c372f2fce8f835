"""A notification is a hint: every way the consumer learns of work, and what it does when hints fail."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta

from tests.support.agents import running_agent
from tests.support.db import add_device, archived, send
from tests.support.devices import ScriptedDriver
from tests.support.wait import until

# poll_interval is 60 s in running_agent: anything done within a few seconds was not the poll.


async def test_notify_wakes_the_idle_consumer(db, dsn):
    await add_device(db, "r1")
    async with running_agent(dsn, ScriptedDriver()) as agent:
        await until(lambda: agent.consumer.wakeups["connect"], what="first read after LISTEN")
        msg = await send(db, {"device": "r1", "service": "wifi", "state": "on"})
        await until(lambda: archived(db, msg), timeout=3)
        assert agent.consumer.wakeups["notify"] >= 1


async def test_insert_in_a_window_whose_notification_went_to_nobody_is_caught_up_after_connect(db, dsn):
    """Found by the fuzz test: an agent that starts (or reconnects) inside a throttle window whose one
    notification went to nobody hears nothing of later inserts in that window; it must read again
    when the window closes, not wait for the poll."""
    await add_device(db, "r1")
    await db.execute("UPDATE pgmq.notify_insert_throttle SET throttle_interval_ms = 4000")
    await send(db, {"device": "r1", "service": "a", "state": "on"})  # opens a 4 s window, heard by no one
    async with running_agent(dsn, ScriptedDriver(), notify_throttle_ms=4000) as agent:
        await until(lambda: agent.consumer.wakeups["connect"], what="first read after LISTEN")
        silent = await send(db, {"device": "r1", "service": "b", "state": "on"})  # same window: no notification
        await until(lambda: archived(db, silent), timeout=10, what="caught up when the window closed")
        assert agent.consumer.wakeups["poll"] == 0


async def test_insert_inside_the_throttle_window_is_caught_up(db, dsn):
    """PGMQ notifies once per throttle window and sends no trailing notification: an insert inside
    the window (PGMQ's own record shows no notification for it) is read without waiting for the
    poll. On a machine so slow that the window closed first, the round is tried again."""
    await add_device(db, "r1")
    last_notified = "SELECT last_notified_at FROM pgmq.notify_insert_throttle WHERE queue_name = 'device_tasks'"
    async with running_agent(dsn, ScriptedDriver(), notify_throttle_ms=5000) as agent:
        await until(lambda: agent.consumer.wakeups["connect"], what="first read after LISTEN")
        for round_ in range(4):
            before = await db.fetchval(last_notified)
            first = await send(db, {"device": "r1", "service": f"a{round_}", "state": "on"})
            window = await db.fetchval(last_notified)  # changed: the first was notified and opened a window
            await until(lambda m=first: archived(db, m), timeout=15)
            second = await send(db, {"device": "r1", "service": f"b{round_}", "state": "on"})
            if window != before and await db.fetchval(last_notified) == window:  # no NOTIFY for the second
                break
            await until(lambda m=second: archived(db, m), timeout=15)
        else:
            raise AssertionError("four rounds in a row, no insert fell inside the window another one opened")
        await until(lambda: archived(db, second), timeout=15, what="caught up within the window's end")
        assert agent.consumer.wakeups["poll"] == 0, agent.consumer.wakeups


async def test_delayed_message_is_read_when_it_becomes_visible(db, dsn):
    await add_device(db, "r1")
    async with running_agent(dsn, ScriptedDriver()):
        await asyncio.sleep(0.3)  # let the start-up reads finish so the next wake is ours
        sent = time.monotonic()
        msg = await send(db, {"device": "r1", "service": "wifi", "state": "on"}, delay=1)
        await until(lambda: archived(db, msg), timeout=5)
        assert time.monotonic() - sent >= 1.0


async def test_listener_killed_by_the_server_reconnects_and_reads(db, dsn):
    await add_device(db, "r1")
    async with running_agent(dsn, ScriptedDriver(), listener_check_interval=0.5) as agent:
        killed = await db.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE application_name LIKE 'agentd session %' AND datname = current_database()")
        assert killed == 1
        await until(lambda: agent.session.reconnects >= 1, timeout=5, what="reconnect")
        await until(lambda: agent.session.connected.is_set(), timeout=5)
        msg = await send(db, {"device": "r1", "service": "wifi", "state": "on"})
        await until(lambda: archived(db, msg), timeout=3)


async def test_message_sent_while_listener_was_down_is_read_after_reconnect(db, dsn):
    await add_device(db, "r1")
    async with running_agent(dsn, ScriptedDriver(), listener_check_interval=0.5) as agent:
        await until(lambda: agent.consumer.wakeups["connect"] == 1)
        await until(lambda: agent.consumer.wakeups["catchup"] == 1, what="the read at the end of the window")
        await db.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                         "WHERE application_name LIKE 'agentd session %' AND datname = current_database()")
        await until(lambda: not agent.session.connected.is_set(), what="listener noticed")
        msg = await send(db, {"device": "r1", "service": "wifi", "state": "on"})  # nobody hears this
        await until(lambda: archived(db, msg), timeout=5)
        assert agent.consumer.wakeups["connect"] == 2 and agent.consumer.wakeups["notify"] == 0, agent.consumer.wakeups


async def test_start_reenables_notifications_lost_in_a_crash(db, dsn):
    """The throttle table is UNLOGGED: after a Postgres crash it is empty and nothing notifies."""
    await db.execute("TRUNCATE pgmq.notify_insert_throttle")
    await add_device(db, "r1")
    async with running_agent(dsn, ScriptedDriver()) as agent:
        assert await db.fetchval("SELECT count(*) FROM pgmq.notify_insert_throttle") == 1
        await until(lambda: agent.consumer.wakeups["connect"])
        msg = await send(db, {"device": "r1", "service": "wifi", "state": "on"})
        await until(lambda: archived(db, msg), timeout=3)
        assert agent.consumer.wakeups["notify"] >= 1


async def test_insert_in_a_window_opened_while_the_last_windows_catch_up_was_pending_is_caught_up(db, dsn):
    """A stream of inserts opens a new throttle window as soon as one closes, so the new window's
    notification arrives while the catch-up read of the one before is still due. That catch-up
    closes the old window, not the new one: a straggler inserted after it, inside the new window,
    must still be read when the new window closes (seen as a command sent 0.1 s after a batch of
    90 waiting for the safety poll). The second window is opened here by moving the first one into
    the past, so that the straggler lands well inside it whatever the machine's speed."""
    window = 3000
    await add_device(db, "r1")
    await db.execute("UPDATE pgmq.notify_insert_throttle SET throttle_interval_ms = $1", window)
    opened = "SELECT last_notified_at FROM pgmq.notify_insert_throttle WHERE queue_name = 'device_tasks'"
    async with running_agent(dsn, ScriptedDriver(), notify_throttle_ms=window) as agent:  # poll: 60 s
        await until(lambda: agent.consumer.wakeups["catchup"] == 1, timeout=10, what="the start-up catch-up")
        first = await send(db, {"device": "r1", "service": "a", "state": "on"})  # opens window 1
        await until(lambda: agent.consumer.wakeups["notify"] == 1, what="window 1's notification")
        await until(lambda: archived(db, first), timeout=3)
        first_opened = await db.fetchval(opened)
        await until(lambda: db.fetchval("SELECT clock_timestamp() - $1::timestamptz > interval '1.5 s'", first_opened),
                    timeout=3, what="window 1 half over")
        await db.execute("UPDATE pgmq.notify_insert_throttle SET last_notified_at = last_notified_at - $1::interval",
                         timedelta(milliseconds=window))  # window 1 is over: the next insert opens window 2
        second = await send(db, {"device": "r1", "service": "b", "state": "on"})
        await until(lambda: agent.consumer.wakeups["notify"] == 2, what="window 2's notification")
        await until(lambda: archived(db, second), timeout=3)
        second_opened = await db.fetchval(opened)
        await until(lambda: db.fetchval("SELECT clock_timestamp() - $1::timestamptz > $2::interval", first_opened,
                                        timedelta(milliseconds=window + 500)),
                    timeout=5, what="window 1's catch-up read done (window 2 still open)")
        straggler = await send(db, {"device": "r1", "service": "c", "state": "on"})
        assert await db.fetchval(opened) == second_opened, "the straggler must land inside window 2 (no notification)"
        await until(lambda: archived(db, straggler), timeout=10, what="the straggler read when window 2 closed")
        assert agent.consumer.wakeups["poll"] == 0


async def test_a_retry_that_became_visible_between_the_read_and_the_look_ahead_is_read_at_once(db, dsn):
    """Found by the WAN burst: a retried message whose lease ran out after the read and before the
    consumer looked for the next one due was neither read nor waited for: it waited for the poll."""
    await add_device(db, "r1")
    async with running_agent(dsn, ScriptedDriver(), notify_throttle_ms=0) as agent:  # no catch-up reads
        await until(lambda: agent.consumer.wakeups["connect"], what="first read after LISTEN")
        msg = await send(db, {"device": "r1", "service": "wifi", "state": "on"}, delay=3600)
        await until(lambda: agent.consumer.wakeups["notify"] and not agent.consumer.work_waits,
                    what="the read its notification caused, done (the message was not visible yet)")
        await db.execute("UPDATE pgmq.q_device_tasks SET vt = clock_timestamp() - interval '1 second' "
                         "WHERE msg_id = $1", msg)  # visible now; nothing notifies that
        await agent.consumer._wake_when_next_visible()  # the look ahead at the end of a read cycle
        await until(lambda: archived(db, msg), timeout=5, what="read at once, not at the 60 s poll")
        assert agent.consumer.wakeups["poll"] == 0
