"""Restores during a month-end burst: how long a customer who paid waits while suspensions drain.

    .venv/bin/python bench/restore_latency.py [--devices 20] [--per-device 1000] [--latency 0.02]
                                              [--restores 40] [--busy 5]

The real agentd as a subprocess at default settings (log level WARNING), its own throwaway Postgres
(pgserver, Unix socket). The devices are sim devices with `--latency` seconds per call, every
service `on`; the burst (`--devices` x `--per-device` suspensions, interleaved by device as a billing
run sends them) is sent in one pgmq.send_batch while the agent is idle. Restores are then sent one
at a time, each after the previous one settled, for services on the `--busy` first devices, until
`--restores` were sent or the burst drained. Per restore: enqueue to `verified` (the database's
clock: events.at minus the message's enqueued_at), and how many suspensions of its device were
still waiting when it settled. Prints figures; asserts nothing (tests/acceptance/test_priority.py does).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pipeline import agentd, fresh_db, stop


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered) + 0.5) - 1))]


async def run(admin: str, args: argparse.Namespace) -> None:
    dsn = await fresh_db(admin, "bench_restore")
    conn = await asyncpg.connect(dsn)
    devices = [f"d{i:03}" for i in range(args.devices)]
    await conn.executemany("INSERT INTO agent.devices (id, driver, options) VALUES ($1, 'sim', $2::jsonb)",
                           [(d, json.dumps({"latency": args.latency, "initial": "on"})) for d in devices])
    proc = agentd(dsn)
    try:
        await asyncio.sleep(3)  # started and idle (LISTEN, inventory)
        burst = [json.dumps({"device": d, "service": f"pppoe:{d}-{n}", "state": "off"})
                 for n in range(args.per_device) for d in devices]
        started = time.monotonic()
        for at in range(0, len(burst), 5000):
            await conn.execute("SELECT pgmq.send_batch('device_tasks', $1::jsonb[])", burst[at:at + 5000])
        rows = []
        for i in range(args.restores):
            dev = devices[i % args.busy]
            if not await conn.fetchval("SELECT EXISTS (SELECT 1 FROM pgmq.q_device_tasks WHERE message->>'state' = "
                                       "'off')"):
                break
            msg = await conn.fetchval("SELECT pgmq.send('device_tasks', $1::jsonb)",
                                      json.dumps({"device": dev, "service": f"pppoe:{dev}-{i}", "state": "on"}))
            while not await conn.fetchval("SELECT EXISTS (SELECT 1 FROM pgmq.a_device_tasks WHERE msg_id = $1)", msg):
                await asyncio.sleep(0.01)
            left = await conn.fetchval("SELECT count(*) FROM pgmq.q_device_tasks WHERE message->>'device' = $1", dev)
            waited = await conn.fetchval(
                "SELECT extract(epoch FROM e.at - a.enqueued_at) FROM agent.events e JOIN pgmq.a_device_tasks a "
                "ON a.msg_id = e.msg_id WHERE e.msg_id = $1 AND e.kind = 'verified'", msg)
            rows.append((float(waited) if waited is not None else float("nan"), left))
        while await conn.fetchval("SELECT EXISTS (SELECT 1 FROM pgmq.q_device_tasks)"):
            await asyncio.sleep(0.1)
        burst_s = time.monotonic() - started
    finally:
        stop(proc)
    await conn.close()
    waits = [w for w, _ in rows]
    print(f"burst: {len(burst):,} suspensions over {args.devices} sim devices at {args.latency * 1000:.0f} ms per "
          f"call drained in {burst_s:.1f} s ({len(burst) / burst_s:,.0f}/s)")
    if waits:
        print(f"restores: {len(waits)} sent one at a time during the burst, enqueue to verified: "
              f"p50 {statistics.median(waits):.3f} s, p99 {pct(waits, 99):.3f} s, max {max(waits):.3f} s")
        print(f"suspensions of the restore's device still waiting when it settled: min {min(n for _, n in rows)}, "
              f"median {statistics.median(n for _, n in rows):.0f}")


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, default=20)
    ap.add_argument("--per-device", type=int, default=1000)
    ap.add_argument("--latency", type=float, default=0.02)
    ap.add_argument("--restores", type=int, default=40)
    ap.add_argument("--busy", type=int, default=5, help="restores go to the first BUSY devices")
    args = ap.parse_args()
    import pgserver

    root = Path(tempfile.mkdtemp(prefix="agent-bench-"))
    os.chmod(root, 0o755)
    server = pgserver.get_server(root / "pg", cleanup_mode="delete")
    try:
        admin = server.get_uri()
        conn = await asyncpg.connect(admin)
        pg_version = await conn.fetchval("SHOW server_version")
        await conn.close()
        load = os.getloadavg()
        print(f"machine: {os.cpu_count()} cores, {platform.python_implementation()} {platform.python_version()}, "
              f"PostgreSQL {pg_version} (pgserver, Unix socket); load average {load[0]:.2f} before the run")
        await run(admin, args)
    finally:
        server.cleanup()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
