"""A budget per device, with agentd and Postgres: max_rate spaces a burst, a breaker parks the work
of a device that stopped answering and resumes it when it answers again."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import socket
import subprocess
import sys

import aiohttp
import pytest

from tests.support.agents import agentctl, spawn_agentd
from tests.support.db import archived, dlq, send
from tests.support.httpdevice import HttpDevice
from tests.support.wait import until

pytestmark = pytest.mark.acceptance

HTTP_OPTIONS = ["--option", "read_path=/rest/ppp/secret/{service}", "--option", "set_method=PATCH",
                "--option", "state_pointer=/disabled", "--option", 'on_value="false"',
                "--option", 'off_value="true"', "--option", 'set_body={"disabled": "{value}"}']


def stop(proc: subprocess.Popen[str]) -> str:
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def most_in_one_second(times: list[float]) -> int:
    return max(sum(1 for t in times if start <= t < start + 1.0) for start in times)


async def test_a_device_with_max_rate_never_sees_more_than_that_in_any_second_of_a_burst(db, dsn):
    names = [f"s{i:02}" for i in range(30)]
    # the device in a process of its own: its clock stamps the requests as they arrive, undisturbed
    box = subprocess.Popen([sys.executable, "-m", "tests.support.httpdevice", "127.0.0.1", "0", *names],
                           stdout=subprocess.PIPE, text=True)
    proc = None
    try:
        port = int(box.stdout.readline().rsplit(":", 1)[1])  # type: ignore[union-attr]
        agentctl(dsn, "device", "add", "r1", "--driver", "http", "--address", f"127.0.0.1:{port}", *HTTP_OPTIONS,
                 "--option", "max_rate=20")
        ids = [await send(db, {"device": "r1", "service": n, "state": "on"}) for n in names]
        proc = spawn_agentd(dsn, poll_interval=60)
        for msg in ids:  # a read, a write and a read-back each: 90 operations, at most 20 a second
            await until(lambda msg=msg: archived(db, msg), timeout=60, interval=0.5, what="the burst applied")
        async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/_control") as resp:
            seen = await resp.json()
    finally:
        if proc is not None:
            stop(proc)
        box.terminate()
        box.communicate(timeout=10)
    assert set(seen["secrets"].values()) == {"false"}  # every secret enabled
    assert len(seen["times"]) >= 90
    times = seen["times"]
    tightest = min(b - a for a, b in zip(times, times[20:]))  # the shortest span of 21 operations
    assert most_in_one_second(times) <= 20, f"21 operations within {tightest:.3f}s"
    print(f"tightest span of 21 operations: {tightest:.3f}s")


async def test_a_device_that_times_out_trips_its_breaker_its_work_parks_and_resumes_after_the_cool_down(db, dsn):
    box = await HttpDevice().start()
    box.secrets = {"alice": "true", "bob": "true", "carol": "true"}
    box.delay = 3.0  # drowning: every request answers after the device timeout
    port = free_port()
    agentctl(dsn, "device", "add", "r1", "--driver", "http", "--address", f"127.0.0.1:{box.port}", *HTTP_OPTIONS,
             "--option", "probe_path=/rest/ppp/secret", "--option", "trip_after=2", "--option", "trip_cooldown=2")
    ids = [await send(db, {"device": "r1", "service": n, "state": "on"}) for n in box.secrets]
    proc = spawn_agentd(dsn, poll_interval=60, device_timeout=1, max_attempts=2, http_listen=f"127.0.0.1:{port}")
    try:
        parked = await until(lambda: db.fetch("SELECT msg_id, error FROM agent.events WHERE kind = 'parked'"),
                             timeout=30, what="the work parked")
        assert "breaker_open: 2 timeouts in a row, retry after " in parked[0]["error"]
        status = await asyncio.to_thread(agentctl, dsn, "status", check=False, http_listen=f"127.0.0.1:{port}")
        assert "breaker open" in status.stdout and "r1: breaker " in status.stdout, status.stdout
        async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/metrics") as resp:
            metrics = await resp.text()
        assert 'pgmq_edge_agent_device_breaker_open{device="r1"} 1.0' in metrics
        if promtool := shutil.which("promtool"):
            lint = subprocess.run([promtool, "check", "metrics"], input=metrics, capture_output=True, text=True)
            assert lint.returncode == 0, lint.stdout + lint.stderr
        box.delay = 0.0  # the router recovers: the probe after the cool-down finds it answering
        for msg in ids:
            await until(lambda msg=msg: archived(db, msg), timeout=30, what="the parked work resumed")
    finally:
        out = await asyncio.to_thread(stop, proc)
        await box.stop()
    assert set(box.secrets.values()) == {"false"}
    assert await dlq(db) == []
    kinds = {r["kind"] for r in await db.fetch("SELECT kind FROM agent.events")}
    assert "dead_lettered" not in kinds and "verified" in kinds
    assert "breaker open after 2 timeouts in a row" in out and "answers again: breaker closed" in out


async def test_bad_budget_options_are_refused_by_device_add_and_import(dsn, tmp_path):
    bad = agentctl(dsn, "device", "add", "r1", "--driver", "sim", "--option", "max_rate=0", check=False)
    assert bad.returncode != 0 and "max_rate must be a number above 0" in bad.stderr
    devices = tmp_path / "devices.json"
    devices.write_text(json.dumps([{"id": "r2", "driver": "sim", "options": {"trip_cooldown": "soon"}}]))
    bad = agentctl(dsn, "device", "import", str(devices), check=False)
    assert bad.returncode != 0 and "trip_cooldown must be a number of seconds" in bad.stderr
    agentctl(dsn, "device", "add", "r3", "--driver", "sim", "--option", "max_rate=0.5", "--option", "trip_after=0")
