"""agentd from its first second: it answers on HTTP while it waits for the database, and a start-up
error names its real cause with the exit status a supervisor can act on."""

from __future__ import annotations

import asyncio
import json
import socket
import urllib.error
import urllib.request

import pytest

from tests.support.agents import spawn_agentd
from tests.support.wait import until

pytestmark = pytest.mark.acceptance


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str) -> tuple[int, dict] | None:
    """(status, JSON body), or None while nothing listens."""
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())
    except (urllib.error.URLError, ConnectionError):
        return None


async def test_status_is_served_while_the_database_is_unreachable_and_says_why(tmp_path):
    port = free_port()
    closed = f"postgresql://agent@127.0.0.1:{free_port()}/nothing"  # nothing listens there
    proc = spawn_agentd(closed, http_listen=f"127.0.0.1:{port}")
    base = f"http://127.0.0.1:{port}"
    status = await until(lambda: _status_saying(base, "database unreachable"), timeout=30,
                         what="/status saying what start-up waits for")
    assert status["state"] == "starting" and "Connect call failed" in status["status"]
    assert await asyncio.to_thread(get, f"{base}/readyz") == (503, {"ready": False})
    assert await asyncio.to_thread(get, f"{base}/healthz") == (200, {"status": "alive"})
    metrics = await asyncio.to_thread(scrape, f"{base}/metrics")  # not ready: PgmqEdgeAgentNotReady, not silence
    assert "\npgmq_edge_agent_ready 0.0\n" in metrics
    assert 'pgmq_edge_agent_build_info{queue="device_tasks",site="default",version="' in metrics
    proc.terminate()
    out, _ = await asyncio.to_thread(proc.communicate, timeout=30)
    assert proc.returncode == 0, out


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.read().decode()


async def _status_saying(base: str, text: str) -> dict | None:
    answer = await asyncio.to_thread(get, f"{base}/status")
    return answer[1] if answer and text in answer[1].get("status", "") else None


async def test_a_busy_http_port_is_a_configuration_error_naming_the_setting(dsn):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = spawn_agentd(dsn, http_listen=f"127.0.0.1:{port}")
        out, _ = await asyncio.to_thread(proc.communicate, timeout=30)
    assert proc.returncode == 2, out
    assert f"cannot listen on AGENT_HTTP_LISTEN 127.0.0.1:{port}: the port is in use" in out
    assert "database" not in out and "Traceback" not in out


async def test_a_device_timeout_raised_by_sighup_reaches_the_drivers(db, dsn, tmp_path):
    """AGENT_DEVICE_TIMEOUT is live: after SIGHUP the driver's own transport timeout is the new one,
    not the one it was built with (a device slower than the old timeout then succeeds)."""
    import signal

    from tests.support.agents import agentctl
    from tests.support.httpdevice import HttpDevice

    box = await HttpDevice().start()
    box.secrets, box.delay = {"alice": "true"}, 1.5  # every request answered after 1.5 s
    config = tmp_path / "agent.toml"
    config.write_text("device_timeout = 0.5\n")
    try:
        _add_router(dsn, box.port)
        proc = spawn_agentd(dsn, "--config", str(config), max_attempts=1000, retry_base=0.2, retry_max=0.5)
        agentctl(dsn, "enqueue", "router-1", "alice", "on", "--request-id", "slow-1")
        await until(lambda: _kinds(db, "slow-1", "retried"), timeout=30, what="a try given up at the 0.5 s timeout")
        config.write_text("device_timeout = 5\n")
        proc.send_signal(signal.SIGHUP)
        await until(lambda: _kinds(db, "slow-1", "verified"), timeout=60, what="the command verified after SIGHUP")
        assert box.secrets == {"alice": "false"}
    finally:
        await box.stop()


async def _kinds(db, request_id: str, kind: str) -> bool:
    return await db.fetchval("SELECT count(*) > 0 FROM agent.events WHERE request_id = $1 AND kind = $2",
                             request_id, kind)


async def test_max_attempts_lowered_by_sighup_dead_letters_the_next_failure(db, dsn, tmp_path):
    """AGENT_MAX_ATTEMPTS is live: after SIGHUP the executor's retry policy is the new one."""
    import signal

    from tests.support.agents import agentctl
    from tests.support.httpdevice import HttpDevice

    box = await HttpDevice().start()
    box.secrets, box.fail = {"alice": "true"}, [503] * 10_000  # the device is busy, for ever
    config = tmp_path / "agent.toml"
    config.write_text("max_attempts = 1000\n")
    try:
        _add_router(dsn, box.port)
        proc = spawn_agentd(dsn, "--config", str(config), retry_base=0.2, retry_max=0.5)
        agentctl(dsn, "enqueue", "router-1", "alice", "on", "--request-id", "busy-1")
        await until(lambda: _kinds(db, "busy-1", "retried"), timeout=30, what="retried under max_attempts=1000")
        config.write_text("max_attempts = 1\n")
        proc.send_signal(signal.SIGHUP)
        await until(lambda: _kinds(db, "busy-1", "dead_lettered"), timeout=30, what="dead-lettered after SIGHUP")
    finally:
        await box.stop()


def _add_router(dsn: str, port: int) -> None:
    from tests.support.agents import agentctl

    agentctl(dsn, "device", "add", "router-1", "--driver", "http", "--address", f"127.0.0.1:{port}",
             "--option", "read_path=/rest/ppp/secret/{service}", "--option", "set_method=PATCH",
             "--option", "state_pointer=/disabled", "--option", 'on_value="false"',
             "--option", 'off_value="true"', "--option", 'set_body={"disabled": "{value}"}')
