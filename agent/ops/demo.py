"""The embedded demo: a throwaway Postgres (pgserver), three simulated devices, the real agentd.

    python -m agent.ops.demo

Starts Postgres, runs `db init`, adds devices, starts `agentd` as a subprocess, sends sample
commands the way a webhook would (SQL only), waits until the queue is empty, prints the
resulting device states, the audit trail and the dead-letter queue, then removes everything.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import asyncpg

from agent.db.queries import Queries
from agent.db.schema import init_database
from agent.model.device import Device
from agent.ops import admin

QUEUE = "device_tasks"
DEVICES = [
    Device("router-1", "sim", site="default", options={"latency": 0.05}),
    Device("cpe-17", "sim", site="default", options={"latency": 0.1, "initial": "on"}),
    Device("switch-3", "sim", site="default", options={"latency": 0.02, "failure_rate": 0.4, "seed": 3}),
]
COMMANDS = [  # (device, service, state, request_id) as a payment webhook would send them
    ("router-1", "pppoe:alice", "on", "pay-1001"),
    ("router-1", "pppoe:bob", "off", "pay-1002"),
    ("cpe-17", "wifi", "off", "pay-1003"),
    ("switch-3", "port-4", "on", "pay-1004"),
    ("router-1", "pppoe:alice", "off", "pay-1005"),   # newer command for the same service wins
    ("router-1", "pppoe:alice", "on", "pay-1005"),    # same request_id again: changes nothing
]


def _say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def _pump(proc: subprocess.Popen[str]) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        print(f"   agentd | {line}", end="", flush=True)


async def _demo(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        _say("agentctl db init")
        result = await init_database(conn, QUEUE)
        print(f"   PGMQ installed from: {result['pgmq']}; schema version {result['schema_version']}")
        await admin.upsert_devices(conn, DEVICES)
        print("   devices: " + ", ".join(d.id for d in DEVICES))

        _say("starting agentd")
        env = {**os.environ, "AGENT_DATABASE_URL": dsn, "AGENT_QUEUE": QUEUE, "AGENT_HTTP_LISTEN": "",
               "AGENT_RETRY_BASE": "0.2", "AGENT_RETRY_MAX": "1"}
        proc = subprocess.Popen([sys.executable, "-m", "agent"], env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        threading.Thread(target=_pump, args=(proc,), daemon=True).start()
        try:
            await _send_samples(conn)
            await _wait_empty(conn)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
        await _show(conn)
        return 0
    finally:
        await conn.close()


async def _send_samples(conn: asyncpg.Connection) -> None:
    _say("a webhook sends commands with SQL: SELECT agent.enqueue(device, service, state, request_id)")
    for device, service, state, rid in COMMANDS:
        msg_id = await admin.enqueue(conn, QUEUE, device, service, state, request_id=rid)
        print(f"   msg {msg_id}: {device} {service} -> {state} (request_id {rid})")
    msg_id = await admin.enqueue(conn, QUEUE, "cpe-17", "wifi", "refresh")
    print(f"   msg {msg_id}: cpe-17 wifi -> refresh (read only)")
    bad = {"device": "router-99", "service": "wifi", "state": "on"}
    msg_id = await conn.fetchval("SELECT pgmq.send($1::text, $2::jsonb)", QUEUE, json.dumps(bad))
    print(f"   msg {msg_id}: plain pgmq.send for a device nobody has (will be dead-lettered)")


async def _wait_empty(conn: asyncpg.Connection, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while await conn.fetchval(Queries(QUEUE).queue_depth):
        if time.monotonic() > deadline:
            raise TimeoutError("queue not empty after 60 s")
        await asyncio.sleep(0.2)


async def _show(conn: asyncpg.Connection) -> None:
    _say("device states (agent.service_state)")
    rows = await admin.states(conn)
    print(f"   {'DEVICE':<10} {'SERVICE':<12} {'DESIRED':<8} {'OBSERVED':<9} VERIFIED")
    for r in rows:
        verified = r["verified_at"].strftime("%H:%M:%S") if r["verified_at"] else "-"
        print(f"   {r['device']:<10} {r['service']:<12} {r['desired'] or '-':<8} {r['observed']:<9} {verified}")
    _say("audit trail (agent.events)")
    for r in await conn.fetch("SELECT kind, device, service, msg_id, request_id, error FROM agent.events ORDER BY id"):
        err = f"  ({r['error']})" if r["error"] else ""
        print(f"   msg {r['msg_id']:<3} {r['kind']:<14} {r['device'] or '-'} {r['service'] or '-'}"
              f" {r['request_id'] or ''}{err}")
    _say("dead-letter queue (agentctl dlq list)")
    for e in await admin.dlq_list(conn, Queries(QUEUE)):
        print(f"   dlq {e['dlq_id']}: {e['reason']}")


def main() -> int:
    import pgserver  # the demo extra: real Postgres binaries in a wheel

    root = Path(tempfile.mkdtemp(prefix="agent-demo-"))
    os.chmod(root, 0o755)
    _say(f"starting an embedded Postgres in {root}")
    server = pgserver.get_server(root / "pg", cleanup_mode="delete")
    try:
        return asyncio.run(_demo(server.get_uri()))
    finally:
        server.cleanup()
        shutil.rmtree(root, ignore_errors=True)
        _say("embedded Postgres removed")


if __name__ == "__main__":
    raise SystemExit(main())
