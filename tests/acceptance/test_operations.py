"""Operating agentd: systemd notify and watchdog, shutdown, metrics, status, heartbeat."""

from __future__ import annotations

import itertools
import json
import shutil
import signal
import socket
import subprocess
import time
from urllib.parse import urlsplit

import aiohttp
import asyncpg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.agents import agentctl, spawn_agentd
from tests.support.db import archived, state
from tests.support.notify import NotifySocket
from tests.support.wait import until

pytestmark = pytest.mark.acceptance


@pytest.fixture
def notify(tmp_path):
    sock = NotifySocket(tmp_path)
    yield sock
    sock.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen[str], sig: int = signal.SIGTERM, timeout: float = 30) -> tuple[int, str]:
    if proc.poll() is None:
        proc.send_signal(sig)
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


async def test_no_ready_when_the_start_up_checks_fail(empty_dsn, notify):
    proc = spawn_agentd(empty_dsn, NOTIFY_SOCKET=notify.path)
    code, out = stop(proc, sig=0)
    assert code == 2 and "agentctl db init" in out
    assert notify.with_key("READY") == []


async def test_ready_watchdog_status_reload_and_stopping(dsn, notify, tmp_path):
    agentctl(dsn, "device", "add", "r1", "--driver", "sim")
    proc = spawn_agentd(dsn, NOTIFY_SOCKET=notify.path, WATCHDOG_USEC="1000000")
    try:
        await until(lambda: notify.with_key("READY", "1"), timeout=15, what="READY=1")
        first_ready = notify.with_key("READY", "1")[0][1]
        assert first_ready["STATUS"].startswith("ready:")
        assert any(s.startswith("starting") for s in notify.statuses())  # said before it was ready
        await until(lambda: len(notify.with_key("WATCHDOG", "1")) >= 3, timeout=5, what="watchdog pings")
        agentctl(dsn, "enqueue", "r1", "wifi", "on")
        await until(lambda: any("1 done" in s for s in notify.statuses()), timeout=10, what="STATUS update")
        proc.send_signal(signal.SIGHUP)
        await until(lambda: notify.with_key("RELOADING", "1"), timeout=5, what="RELOADING=1")
        reloading = notify.with_key("RELOADING", "1")[0]
        assert int(reloading[1]["MONOTONIC_USEC"]) > 0
        await until(lambda: [t for t, _ in notify.with_key("READY", "1") if t > reloading[0]], timeout=5)
    finally:
        code, out = stop(proc)
    assert code == 0, out
    assert notify.with_key("STOPPING", "1")


async def test_watchdog_keeps_being_fed_through_a_database_outage(dsn, pg_admin_dsn, notify):
    name = urlsplit(dsn).path.lstrip("/")
    admin = await asyncpg.connect(pg_admin_dsn)
    proc = spawn_agentd(dsn, NOTIFY_SOCKET=notify.path, WATCHDOG_USEC="1000000",
                        heartbeat_interval=1)
    try:
        await until(lambda: notify.with_key("READY", "1"), timeout=15)
        await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        await admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", name)
        await until(lambda: any(s.startswith("degraded: database unreachable") for s in notify.statuses()),
                    timeout=30, what="degraded status")  # the next heartbeat (1 s) fails; slower on a loaded machine
        outage_start = time.monotonic()
        await until(lambda: time.monotonic() - outage_start > 4, timeout=6)
        pings = [t for t, _ in notify.with_key("WATCHDOG", "1") if t > outage_start]
        assert len(pings) >= 3 and proc.poll() is None
    finally:
        await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        await admin.close()
    try:
        await until(lambda: notify.statuses()[-1].startswith("ready:"), timeout=20, what="ready again")
    finally:
        code, out = stop(proc)
    assert code == 0, out


async def test_watchdog_is_fed_through_a_backlog_that_outlasts_it(dsn, db, notify):
    """Month-end under systemd: a backlog that takes several watchdog timeouts to drain. The agent
    verifies commands the whole time, so WATCHDOG=1 never pauses longer than WATCHDOG_USEC (systemd
    would kill it then); only a stalled agent stops the pings."""
    timeout_s, commands = 2.0, 120
    for i in range(3):
        agentctl(dsn, "device", "add", f"w{i}", "--driver", "sim", "--option", "latency=0.1")
    for i in range(commands):
        await db.fetchval("SELECT agent.enqueue($1, $2, 'on')", f"w{i % 3}", f"svc{i}")
    verified = "SELECT count(*) FROM agent.events WHERE kind = 'verified'"
    proc = spawn_agentd(dsn, NOTIFY_SOCKET=notify.path, WATCHDOG_USEC=str(int(timeout_s * 1e6)), watchdog_stall=5,
                        coalesce=1, batch_size=10, prefetch=10, concurrency=3, log_level="WARNING")
    try:
        await until(lambda: notify.with_key("READY", "1"), timeout=15, what="READY=1")
        started = notify.with_key("READY", "1")[0][0]
        await until(lambda: db.fetchval(verified + " HAVING count(*) = $1", commands), timeout=90, what="all verified")
        done = time.monotonic()
        assert done - started > 3 * timeout_s, "the backlog must outlast several watchdog timeouts"
        await until(lambda: [t for t, _ in notify.with_key("WATCHDOG", "1") if t > done], timeout=2 * timeout_s,
                    what="a ping after the backlog")
        assert proc.poll() is None
    finally:
        code, out = stop(proc)
    assert code == 0, out
    pings = [started] + [t for t, _ in notify.with_key("WATCHDOG", "1") if t > started]
    pings = pings[: next(i for i, t in enumerate(pings) if t > done) + 1]
    gaps = [round(b - a, 2) for a, b in itertools.pairwise(pings)]
    assert max(gaps) < timeout_s, f"WATCHDOG=1 paused {max(gaps)} s during the backlog (gaps: {gaps}); {out}"
    assert "watchdog not fed" not in out


async def test_sigterm_with_slow_work_in_flight_loses_nothing(dsn, db):
    for i in range(4):  # a command takes three calls of 4 s: none can finish within the 1 s drain
        agentctl(dsn, "device", "add", f"slow{i}", "--driver", "sim", "--option", "latency=4")
    proc = spawn_agentd(dsn, drain_timeout=1, visibility_timeout=60)
    ids = [int(agentctl(dsn, "enqueue", f"slow{i}", "wifi", "on").stdout) for i in range(4)]
    await until(lambda: db.fetchval('SELECT count(*) = 4 FROM pgmq."q_device_tasks" WHERE read_ct > 0'),
                timeout=15, what="all four in flight")
    code, out = stop(proc)
    assert code == 0, out
    # the stop did not wait for the work (none finished), and released it at once, not after the
    # 60 s lease: the next daemon takes it straight away
    assert not any([await archived(db, i) for i in ids])
    visible = await db.fetchval('SELECT count(*) FROM pgmq."q_device_tasks" WHERE vt <= clock_timestamp()')
    assert visible == 4
    code, out = stop(spawn_agentd(dsn, "--once"), sig=0, timeout=60)
    assert code == 0, out
    assert all([await archived(db, i) for i in ids])
    assert all([(await state(db, f"slow{i}", "wifi"))["observed"] == "on" for i in range(4)])


async def test_metrics_are_valid_prometheus_text(dsn):
    agentctl(dsn, "device", "add", "r1", "--driver", "sim")
    port = free_port()
    proc = spawn_agentd(dsn, http_listen=f"127.0.0.1:{port}")
    try:
        agentctl(dsn, "enqueue", "r1", "wifi", "on")
        async with aiohttp.ClientSession() as http:
            async def scrape() -> str | None:
                try:
                    async with http.get(f"http://127.0.0.1:{port}/metrics") as resp:
                        text = await resp.text()
                        done = 'pgmq_edge_agent_commands_total{driver="sim",outcome="verified"} 1.0'
                        return text if done in text else None
                except aiohttp.ClientConnectionError:
                    return None

            text = await until(scrape, timeout=15, what="verified command in /metrics")
    finally:
        stop(proc)
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("pgmq_edge_agent_commands", "pgmq_edge_agent_command_duration_seconds",
                 "pgmq_edge_agent_command_queue_wait_seconds", "pgmq_edge_agent_inflight_messages",
                 "pgmq_edge_agent_wakeups", "pgmq_edge_agent_listener_reconnects", "pgmq_edge_agent_queue_messages",
                 "pgmq_edge_agent_queue_oldest_message_age_seconds", "pgmq_edge_agent_build_info",
                 "pgmq_edge_agent_ready", "process_cpu_seconds", "python_gc_collections"):
        assert name in families, name
    depth = {s.labels["queue"]: s.value for s in families["pgmq_edge_agent_queue_messages"].samples}
    assert set(depth) == {"device_tasks", "device_tasks_dlq"} and depth["device_tasks_dlq"] == 0
    assert 'pgmq_edge_agent_commands_total{driver="sim",outcome="dead_lettered"} 0.0' in text  # before the first
    assert "_created" not in text and "\nagent_" not in text
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package `prometheus`): text parsed, not linted")
    lint = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr


async def test_a_month_end_drain_walks_the_young_objects_a_handful_of_times_not_hundreds(dsn, db):
    """CPython walks its young objects every 700 allocations, and a verified command leaves some
    twenty behind until it is reported: at its defaults a drain of 3,000 commands walked them about
    sixty times, to find almost nothing (a seventh of agentd's CPU at month-end). Once started,
    agentd walks them every 50,000 allocations (agent/runtime/collector.py)."""
    commands = 3000
    for i in range(30):
        agentctl(dsn, "device", "add", f"r{i}", "--driver", "sim")
    port = free_port()
    proc = spawn_agentd(dsn, http_listen=f"127.0.0.1:{port}", log_level="WARNING")
    try:
        async with aiohttp.ClientSession() as http:
            async def young_walks() -> float | None:
                try:
                    async with http.get(f"http://127.0.0.1:{port}/metrics") as resp:
                        text = await resp.text()
                except aiohttp.ClientConnectionError:
                    return None
                for family in text_string_to_metric_families(text):
                    for sample in family.samples:
                        if sample.name == "python_gc_collections_total" and sample.labels["generation"] == "0":
                            return sample.value
                return None

            await until(lambda: db.fetchval("SELECT count(*) = 1 FROM agent.agents WHERE state = 'ready'"),
                        timeout=30, what="agentd ready")  # started: the collector is set
            before = await young_walks()
            await db.execute("SELECT agent.enqueue('r' || (i % 30), 'svc' || i, 'on') FROM generate_series(1, $1) i",
                             commands)
            await until(lambda: db.fetchval("SELECT count(*) = $1 FROM agent.events WHERE kind = 'verified'",
                                            commands), timeout=60, what="all verified")
            after = await young_walks()
    finally:
        code, out = stop(proc)
    assert code == 0, out
    assert after is not None and after - before <= 10, f"{after - before} walks of the young objects in the drain"


async def test_status_of_a_running_and_of_a_stopped_daemon(dsn):
    port = free_port()
    proc = spawn_agentd(dsn, http_listen=f"127.0.0.1:{port}")
    try:
        await until(lambda: agentctl(dsn, "status", check=False, http_listen=f"127.0.0.1:{port}").returncode == 0,
                    timeout=15, what="status healthy")
        text = agentctl(dsn, "status", http_listen=f"127.0.0.1:{port}").stdout
        assert text.startswith("ready: ") and "database  ok" in text and "recent failures: none" in text
        snap = json.loads(agentctl(dsn, "status", "--json", http_listen=f"127.0.0.1:{port}").stdout)
        assert snap["healthy"] is True and snap["state"] == "ready" and snap["listener_up"] is True
        fleet = agentctl(dsn, "status", "--fleet", "--json").stdout
        assert [a["state"] for a in json.loads(fleet)["agents"]] == ["ready"]
    finally:
        code, out = stop(proc)
    assert code == 0, out
    down = agentctl(dsn, "status", check=False, http_listen=f"127.0.0.1:{port}")
    assert down.returncode == 1 and down.stdout.startswith("down: agentd is not running")
    assert json.loads(agentctl(dsn, "status", "--json", check=False,
                               http_listen=f"127.0.0.1:{port}").stdout)["healthy"] is False
    fleet = json.loads(agentctl(dsn, "status", "--fleet", "--json", check=False).stdout)
    assert [a["state"] for a in fleet["agents"]] == ["stopped"]
    assert fleet["tables"]["events"]["bytes"] > 0 and fleet["tables"]["dlq"]["oldest_row_age_s"] is None
    text = agentctl(dsn, "status", "--fleet", check=False).stdout
    assert "tables (size, oldest row):" in text and "archive" in text


async def test_second_signal_stops_at_once_and_still_loses_nothing(dsn, db, notify):
    agentctl(dsn, "device", "add", "slow", "--driver", "sim", "--option", "latency=3")
    proc = spawn_agentd(dsn, drain_timeout=60, visibility_timeout=120, NOTIFY_SOCKET=notify.path)
    msg = int(agentctl(dsn, "enqueue", "slow", "wifi", "on").stdout)
    await until(lambda: db.fetchval('SELECT read_ct > 0 FROM pgmq."q_device_tasks" WHERE msg_id = $1', msg),
                timeout=15, what="in flight")
    proc.send_signal(signal.SIGTERM)
    await until(lambda: notify.with_key("STOPPING", "1"), timeout=5, what="STOPPING=1: draining")
    started = time.monotonic()
    code, out = stop(proc, sig=signal.SIGTERM)
    assert code == 130, out
    assert time.monotonic() - started < 5  # not the 60 s drain
    assert "second signal" in out
    assert await db.fetchval('SELECT vt <= clock_timestamp() FROM pgmq."q_device_tasks" WHERE msg_id = $1', msg)


async def test_consume_off_serves_status_but_leaves_the_queue_alone(dsn, db):
    agentctl(dsn, "device", "add", "r1", "--driver", "sim")
    port = free_port()
    proc = spawn_agentd(dsn, consume="false", http_listen=f"127.0.0.1:{port}")
    try:
        await until(lambda: agentctl(dsn, "status", check=False, http_listen=f"127.0.0.1:{port}").returncode == 0,
                    timeout=15, what="status healthy")
        msg = int(agentctl(dsn, "enqueue", "r1", "wifi", "on").stdout)
        await until(lambda: json.loads(agentctl(dsn, "status", "--json", http_listen=f"127.0.0.1:{port}").stdout)
                    ["status"].startswith("ready"), timeout=5)
        assert await db.fetchval('SELECT read_ct FROM pgmq."q_device_tasks" WHERE msg_id = $1', msg) == 0
    finally:
        code, out = stop(proc)
    assert code == 0, out
