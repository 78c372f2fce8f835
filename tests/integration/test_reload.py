"""A reload (what SIGHUP runs): the live settings are swapped in whole and every part that uses one
reads the new value at once; a file that does not validate changes nothing."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from agent.errors import TransientError
from agent.executor.policy import RetryPolicy, Tuning
from agent.settings import LiveSettings
from tests.support.agents import running_agent
from tests.support.db import add_device, events, send
from tests.support.devices import ScriptedDriver
from tests.support.wait import until

# what running_agent starts with, so that a reload changes only what a test writes
STARTED = {"http_listen": "", "poll_interval": 60.0, "retry_base": 0.05, "retry_max": 0.2, "visibility_timeout": 5,
           "reconcile_schedule": "off"}


def write(config: Path, dsn: str, **settings: Any) -> None:
    values = {"database_url": dsn, **STARTED, **settings}
    config.write_text("".join(f"{k} = {_toml(v)}\n" for k, v in values.items()))


def _toml(value: Any) -> str:
    return f'"{value}"' if isinstance(value, str) else str(value)


async def test_a_reload_swaps_in_every_live_setting_and_each_part_reads_it(db, dsn, tmp_path):
    await add_device(db, "r1")
    config = tmp_path / "agent.toml"
    root = logging.getLogger()
    level = root.level
    try:
        async with running_agent(dsn, ScriptedDriver(), config=config) as agent:
            device = agent.inventory.devices["r1"]
            bound = agent.executor.op_bound(device)
            write(config, dsn, log_level="DEBUG", poll_interval=0.5, max_attempts=3, retry_base=0.5, retry_max=9,
                  device_timeout=1, heartbeat_interval=1, watchdog_stall=30, guard_window=60, guard_off_min=7,
                  guard_off_percent=50)
            await agent.reload()
            assert agent.live.current() == LiveSettings("DEBUG", 0.5, 3, 0.5, 9, 1, 1, 30, 60, 7, 50)
            assert agent.tuning() == Tuning(RetryPolicy(3, 0.5, 9), 1.0)  # the executor's and reconcile's
            assert agent.executor.op_bound(device) == bound - 3 * (10 - 1)  # three calls, each 1 s now
            assert agent.acceptor.guard().args() == ("default", 7, 50.0, 60.0)
            assert root.level == logging.DEBUG
            seen = {agent.house.last_beat}
            await until(lambda: _heartbeats(agent, seen) >= 2, timeout=8,
                        what="two more heartbeats a second apart, not one in a minute")
            polls = agent.consumer.wakeups["poll"]
            await until(lambda: agent.consumer.wakeups["poll"] >= polls + 2, timeout=5,
                        what="safety-net polls every half second, not the next one in a minute")
    finally:
        root.setLevel(level)


async def test_a_reload_lowering_max_attempts_dead_letters_the_next_failure(db, dsn, tmp_path):
    await add_device(db, "r1")
    driver = ScriptedDriver()
    driver.fail("r1", "wifi", TransientError("the device is busy"), times=1000)
    config = tmp_path / "agent.toml"
    async with running_agent(dsn, driver, config=config, max_attempts=1000) as agent:
        msg = await send(db, {"device": "r1", "service": "wifi", "state": "on"})
        await until(lambda: _has(events(db, msg), "retried"), what="retried under max_attempts=1000")
        write(config, dsn, max_attempts=1)
        await agent.reload()
        await until(lambda: _has(events(db, msg), "dead_lettered"), timeout=10, what="dead-lettered when it next fails")


async def test_a_reload_from_a_file_that_does_not_validate_keeps_the_running_snapshot_whole(db, dsn, tmp_path,
                                                                                           caplog):
    config = tmp_path / "agent.toml"
    async with running_agent(dsn, ScriptedDriver(), config=config) as agent:
        running = agent.live.current()
        write(config, dsn, device_timeout=1, max_attempts=2, poll_interval=-1)  # the last one is invalid
        await agent.reload()
        assert agent.live.current() is running
        assert agent.tuning().device_timeout == 10 and agent.tuning().policy.max_attempts == 10
        assert "reload refused, keeping the running configuration" in caplog.text
        assert "AGENT_POLL_INTERVAL" in caplog.text


async def test_a_reload_names_the_settings_that_need_a_restart_and_leaves_them(db, dsn, tmp_path, caplog):
    config = tmp_path / "agent.toml"
    async with running_agent(dsn, ScriptedDriver(), config=config) as agent:
        write(config, dsn, concurrency=3, device_timeout=2)
        await agent.reload()
        assert "settings changed that need a restart: AGENT_CONCURRENCY" in caplog.text
        assert agent.settings.concurrency == 32 and agent.live.current().device_timeout == 2


async def _has(coro, kind: str) -> bool:  # type: ignore[no-untyped-def]
    return kind in await coro


def _heartbeats(agent, seen: set[float | None]) -> int:  # type: ignore[no-untyped-def]
    """Heartbeat rows written since `seen` began (the housekeeper's last_beat is the latest one's time)."""
    seen.add(agent.house.last_beat)
    return len(seen) - 1
