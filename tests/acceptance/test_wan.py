"""A month-end burst to a router behind a WAN-like link: replies late, in segments, and large.

Loopback hands every reply over in one piece; a VPN to a customer site (MTU ~1420) does not. Here
agentd reaches an http device through tests/support/wan.py's TCP proxy, and the device lists 3,000
PPP secrets (~550 KB) at its list_path, which the agent reads before and after every take.
"""

from __future__ import annotations

import asyncio
import json
import subprocess

import pytest

from tests.support.agents import agentctl, spawn_agentd
from tests.support.db import archived, dlq, send, state
from tests.support.httpdevice import HttpDevice
from tests.support.wan import TcpProxy

pytestmark = pytest.mark.acceptance

CUSTOMERS = [f"customer-{n:05d}" for n in range(3000)]
ROUTER = {"read_path": "/rest/ppp/secret/{service}", "list_path": "/rest/ppp/secret", "set_method": "PATCH",
          "state_pointer": "/disabled", "on_value": "false", "off_value": "true",
          "set_body": {"disabled": "{value}"}, "timeout": 10}


def finish(proc: subprocess.Popen[str], timeout: float = 120) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


async def test_a_burst_through_a_wan_link_with_large_list_replies_is_all_verified(db, dsn):
    box = await HttpDevice().start()
    box.secrets = dict.fromkeys(CUSTOMERS, "true")  # every customer suspended
    paid = CUSTOMERS[::15]  # 200 of them paid: unsuspend
    try:
        async with TcpProxy(("127.0.0.1", box.port), latency=0.005, segment=1380, gap=0.001) as wan:
            agentctl(dsn, "device", "add", "router-1", "--driver", "http", "--address", wan.address,
                     *[arg for key, value in ROUTER.items() for arg in ("--option", f"{key}={json.dumps(value)}")])
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
