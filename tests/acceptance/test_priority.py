"""Restores first, with the real agentd and Postgres: while a month-end burst of suspensions drains,
restores sent one at a time for services on the busiest devices are verified long before their
devices' suspensions are done, and the latency histogram shows them.

Scale: 10,000 suspensions over 10 sim devices at 20 ms per device call (every device equally busy:
1,000 each, sent interleaved as a billing run sends them). On this shared 2-core test machine the
burst lasts about 20-30 s, a restore 0.1-0.3 s. Nothing here is timed against the clock: each
restore must be verified while suspensions for its own device still wait in the queue (an agent
that serves a lane in enqueue order verifies it only after all of them), and the restores' median
latency must stay below a tenth of the burst's own duration, both measured in the same run.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import statistics
import time
import urllib.request

import pytest

from tests.support.agents import spawn_agentd
from tests.support.db import add_device, send
from tests.support.wait import until

pytestmark = pytest.mark.acceptance

DEVICES = 10
PER_DEVICE = 1000
LATENCY = 0.02
RESTORES = 8
PENDING_FLOOR = 200  # a restore is sent only while its device has at least this many suspensions waiting


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return resp.read().decode()


def ready(port: int) -> bool:
    try:
        return "pgmq_edge_agent_ready 1.0" in scrape(port)
    except OSError:
        return False


def sample(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith(f"{name}{{{want}}} "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def pending(db, device: str) -> int:  # type: ignore[no-untyped-def]
    return await db.fetchval("SELECT count(*) FROM pgmq.q_device_tasks WHERE message->>'device' = $1 "
                             "AND message->>'state' = 'off'", device)


async def test_restores_are_verified_while_the_suspensions_on_their_devices_still_wait(db, dsn):
    devices = [f"d{i}" for i in range(DEVICES)]
    for dev in devices:
        await add_device(db, dev, "sim", {"latency": LATENCY, "initial": "on"})
    port = free_port()
    # a month-end of 10,000 suspensions: the guard against mass suspension is not what this test is about
    proc = spawn_agentd(dsn, http_listen=f"127.0.0.1:{port}", log_level="WARNING", guard_off_percent=100)
    try:
        await until(lambda: asyncio.to_thread(ready, port), timeout=30, interval=0.2, what="agentd ready")
        burst = [json.dumps({"device": dev, "service": f"pppoe:{dev}-{n}", "state": "off"})
                 for n in range(PER_DEVICE) for dev in devices]  # interleaved, as a billing run sends them
        started = time.monotonic()
        await db.execute("SELECT pgmq.send_batch('device_tasks', $1::jsonb[])", burst)
        latencies: list[float] = []
        left_behind: list[int] = []  # suspensions of the restore's device still waiting when it was verified
        for i in range(RESTORES):
            dev = devices[i % 3]  # the first devices of each round: as busy as any
            if await pending(db, dev) < PENDING_FLOOR:
                break
            msg = await send(db, {"device": dev, "service": f"pppoe:{dev}-{i}", "state": "on"})  # paid
            await until(lambda msg=msg: db.fetchval(
                'SELECT EXISTS (SELECT 1 FROM pgmq."a_device_tasks" WHERE msg_id = $1)', msg),
                timeout=120, interval=0.02, what=f"restore {msg} settled")
            left_behind.append(await pending(db, dev))
            row = await db.fetchrow(
                "SELECT e.kind, extract(epoch FROM e.at - a.enqueued_at) AS waited FROM agent.events e "
                "JOIN pgmq.a_device_tasks a ON a.msg_id = e.msg_id WHERE e.msg_id = $1 AND e.kind = 'verified'", msg)
            assert row is not None, f"restore {msg} was not verified"
            latencies.append(float(row["waited"]))
        await until(lambda: db.fetchval("SELECT count(*) = 0 FROM pgmq.q_device_tasks"), timeout=600, interval=0.2,
                    what="the burst drained")
        burst_s = time.monotonic() - started
        text = await asyncio.to_thread(scrape, port)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    print(f"burst {burst_s:.1f}s; restores {[round(x, 2) for x in latencies]} p50 {statistics.median(latencies):.2f}s; "
          f"suspensions left behind on their devices {left_behind}")
    assert len(latencies) >= 3, f"too few restores sent during the burst ({burst_s:.1f}s)"
    assert all(n > 0 for n in left_behind), left_behind  # each verified before its device's suspensions drained
    assert statistics.median(latencies) < burst_s / 10, (latencies, burst_s)
    high = "pgmq_edge_agent_command_latency_seconds_count"
    assert sample(text, high, priority="high", state="on") >= len(latencies)
    assert sample(text, high, priority="normal", state="off") > 0
    assert proc.returncode == 0, out[-2000:]
