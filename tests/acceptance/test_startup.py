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
    proc.terminate()
    out, _ = await asyncio.to_thread(proc.communicate, timeout=30)
    assert proc.returncode == 0, out


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
