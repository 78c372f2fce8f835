"""Run an agent in-process (integration tests) or agentd/agentctl as subprocesses (acceptance)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from agent.drivers.base import DriverContext
from agent.drivers.registry import Drivers
from agent.runtime.daemon import Agent, connect_pool
from agent.settings import load_settings


@asynccontextmanager
async def running_agent(dsn: str, driver: Any = None, config: Path | None = None,
                        **overrides: Any) -> AsyncIterator[Agent]:
    """A wired Agent running its services; `driver` is preset under its own name; `config`: the file
    its reload (what SIGHUP runs) reads."""
    defaults = {"http_listen": "", "poll_interval": 60.0, "retry_base": 0.05, "retry_max": 0.2,
                "visibility_timeout": 5, "reconcile_schedule": "off"}
    settings = load_settings(None, database_url=dsn, **{**defaults, **overrides})
    pool = await connect_pool(settings, attempts=1)
    # as the daemon's own: the drivers read the device timeout from the agent's live settings
    drivers = Drivers(DriverContext(lambda: agent.live.current().device_timeout),
                      {driver.name: driver} if driver else None)
    agent = Agent(settings, pool, drivers, settings_path=config)
    stop = asyncio.Event()
    task = None
    try:
        await agent.start()
        task = asyncio.create_task(agent.run_forever(stop))
        await asyncio.wait_for(agent.session.connected.wait(), 10)
        yield agent
    finally:
        stop.set()
        if task is not None:
            await asyncio.wait_for(task, 30)
        await drivers.close()
        await pool.close()


def agent_env(dsn: str, raw_env: bool = False, **settings: Any) -> dict[str, str]:
    """Environment for a subprocess: AGENT_<KEY> for lower-case keys, UPPER-case keys as they are."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("AGENT_") and k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
    env["AGENT_DATABASE_URL"] = dsn
    env.setdefault("AGENT_HTTP_LISTEN", "")
    env.setdefault("AGENT_REQUIRE_VPN", "false")  # devices in tests are on loopback unless a test says otherwise
    # No scheduled reconcile unless a test asks for one: a cron minute boundary crossed mid-test
    # must not add work the test did not expect.
    env.setdefault("AGENT_RECONCILE_SCHEDULE", "off")
    for key, value in settings.items():
        env[key if key.isupper() else f"AGENT_{key.upper()}"] = str(value)
    return env


def _in(netns: str | None) -> list[str]:
    """Prefix that runs a command inside a network namespace (the database stays on its Unix socket)."""
    return ["ip", "netns", "exec", netns] if netns else []


def agentctl(dsn: str, *args: str, check: bool = True, netns: str | None = None,
             **settings: Any) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([*_in(netns), sys.executable, "-m", "agent.cli.agentctl", *args],
                          env=agent_env(dsn, **settings), capture_output=True, text=True, timeout=60)
    if check and proc.returncode != 0:
        raise AssertionError(f"agentctl {' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
    return proc


SPAWNED: list[subprocess.Popen[str]] = []


def spawn_agentd(dsn: str, *args: str, netns: str | None = None, **settings: Any) -> subprocess.Popen[str]:
    """agentd as a subprocess; any still running when its test ends is killed (see conftest)."""
    proc = subprocess.Popen([*_in(netns), sys.executable, "-m", "agent", *args], env=agent_env(dsn, **settings),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    SPAWNED.append(proc)
    return proc


def kill_leftovers() -> None:
    while SPAWNED:
        proc = SPAWNED.pop()
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
