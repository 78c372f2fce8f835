"""A month-end burst to a router behind a WAN-like link: replies late, in segments, and large.

Loopback hands every reply over in one piece; a VPN to a customer site (MTU ~1420) does not. Here
agentd reaches an http device through tests/support/wan.py's TCP proxy, and the device lists 3,000
PPP secrets (~550 KB) at its list_path, which the agent reads before and after every take.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess

import pytest

from tests.support.agents import agentctl, spawn_agentd
from tests.support.db import archived, dlq, send, state
from tests.support.httpdevice import HttpDevice
from tests.support.wait import until
from tests.support.wan import TcpProxy

pytestmark = pytest.mark.acceptance

CUSTOMERS = [f"customer-{n:05d}" for n in range(3000)]
ROUTER = {"read_path": "/rest/ppp/secret/{service}", "list_path": "/rest/ppp/secret", "set_method": "PATCH",
          "state_pointer": "/disabled", "on_value": "false", "off_value": "true",
          "set_body": {"disabled": "{value}"}, "timeout": 10}


def add_router(dsn: str, address: str) -> None:
    agentctl(dsn, "device", "add", "router-1", "--driver", "http", "--address", address,
             *[arg for key, value in ROUTER.items() for arg in ("--option", f"{key}={json.dumps(value)}")])


def finish(proc: subprocess.Popen[str], timeout: float = 120) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


async def test_a_burst_through_a_wan_link_with_large_list_replies_is_all_verified(db, dsn):
    box = await HttpDevice().start()
    box.secrets = dict.fromkeys(CUSTOMERS, "true")  # every customer suspended
    paid = CUSTOMERS[::15]  # 200 of them paid: unsuspend
    try:
        async with TcpProxy(("127.0.0.1", box.port), latency=0.005, segment=1380, gap=0.001) as wan:
            add_router(dsn, wan.address)
            ids = [await send(db, {"device": "router-1", "service": name, "state": "on", "request_id": f"pay-{name}"})
                   for name in paid]
            code, out = await asyncio.to_thread(finish, spawn_agentd(dsn, "--once"))  # the device answers meanwhile
    finally:
        await box.stop()
    assert code == 0, out
    assert await dlq(db) == []
    assert all([await archived(db, i) for i in ids])
    assert f"{len(paid)} done, 0 retry later, 0 dead-lettered" in out
    assert {n for n, disabled in box.secrets.items() if disabled == "false"} == set(paid)
    assert all([(await state(db, "router-1", name))["observed"] == "on" for name in paid])
    verified = await db.fetchval("SELECT count(*) FROM agent.events WHERE kind = 'verified'")
    assert verified == len(paid)
    lists = sum(1 for method, path in box.requests if (method, path) == ("GET", "/rest/ppp/secret"))
    assert lists >= 2 and len(wan.segments) > 400 * lists, "every list reply crossed the link in MTU-sized segments"


async def test_a_connection_reset_in_the_middle_of_a_list_reply_is_retried_and_nothing_is_dead_lettered(db, dsn):
    box = await HttpDevice().start()
    box.secrets = dict.fromkeys(CUSTOMERS, "true")
    paid = CUSTOMERS[::150]  # 20 of them
    proc = None
    try:
        async with TcpProxy(("127.0.0.1", box.port), latency=0.005, segment=1380, gap=0.001,
                            reset_after=100_000) as wan:  # the VPN drops the first connection 100 KB into a reply
            add_router(dsn, wan.address)
            ids = [await send(db, {"device": "router-1", "service": name, "state": "on"}) for name in paid]
            proc = spawn_agentd(dsn, retry_base=0.2, retry_max=0.5)  # the safety poll (30 s) is not needed
            await until(lambda: wan.resets, timeout=30, what="the connection reset mid-reply")
            wan.reset_after = None  # the tunnel is back
            await until(lambda: all_archived(db, ids), timeout=60, what="every command verified")
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            code, out = await asyncio.to_thread(finish, proc, 30)
        await box.stop()
    assert code == 0, out
    assert await dlq(db) == []
    assert {n for n, disabled in box.secrets.items() if disabled == "false"} == set(paid)
    verified = await db.fetchval("SELECT count(*) FROM agent.events WHERE kind = 'verified'")
    assert verified == len(paid), out
    # the cut list read was a transient failure (never "not JSON"): the take read its services one by one
    # (or, had those failed too, was retried)
    assert "ClientPayloadError" in out and "not JSON" not in out
    retried = await db.fetchval("SELECT count(*) FROM agent.events WHERE kind = 'retried'")
    assert "batch_read_failed" in out or retried > 0


async def all_archived(db, ids: list[int]) -> bool:
    return all([await archived(db, i) for i in ids])
