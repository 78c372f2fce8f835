"""Hardening where the database is the adversary or the casualty: agentd with least privilege, a
forged queue id, a Postgres crash, an inventory that cannot be read. Real agentd, real Postgres."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from agent.db.leadership import current_leader
from tests.support.agents import agentctl, spawn_agentd
from tests.support.cluster import CrashableCluster, as_user, login_role
from tests.support.db import archived, dlq, events, state
from tests.support.wait import until

pytestmark = pytest.mark.acceptance

FORGED_ID = 9_000_000_000_000_000_000


def stop(proc: subprocess.Popen[str]) -> tuple[int, str]:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    return proc.returncode, out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def ready(db: asyncpg.Connection) -> bool:
    return bool(await db.fetchval("SELECT count(*) = 1 FROM agent.agents WHERE state = 'ready'"))


def device_file(path: Path) -> dict[str, str]:
    try:
        return json.loads(path.read_text() or "{}")
    except (FileNotFoundError, ValueError):
        return {}


@pytest.fixture
async def worker_dsn(dsn: str) -> AsyncIterator[str]:
    """agentd's database URL as a LOGIN member of agent_worker (and nothing else)."""
    async with login_role(dsn, "agent_worker") as name:
        yield as_user(dsn, name)


@pytest.fixture
def cluster() -> Iterator[CrashableCluster]:
    """A cluster of this test's own: it is crashed, the shared one must not be."""
    c = CrashableCluster()
    yield c
    c.close()


async def test_agentd_logged_in_as_a_worker_applies_what_a_producer_enqueued(db, dsn, worker_dsn):
    agentctl(dsn, "device", "add", "r1", "--driver", "sim")
    proc = spawn_agentd(worker_dsn, poll_interval=60, reconcile_schedule="1")
    try:
        await until(lambda: ready(db), timeout=15, what="agentd (agent_worker member) ready")
        async with login_role(dsn, "agent_producer") as webhook:
            producer = await asyncpg.connect(as_user(dsn, webhook))
            msg = await producer.fetchval("SELECT agent.enqueue('r1', 'wifi', 'on', request_id => 'pay-1')")
            await producer.close()
        await until(lambda: archived(db, msg), timeout=15, what="command applied by agentd as agent_worker")
        await until(lambda: current_leader(db, "default"), timeout=30, what="agentd as agent_worker leads its site")
        await until(lambda: db.fetchval("SELECT count(*) > 0 FROM agent.sync_runs WHERE kind = 'scheduled' AND "
                                        "checked = 1 AND finished_at IS NOT NULL"), timeout=30,
                    what="a scheduled reconcile run by agentd as agent_worker")
    finally:
        code, out = stop(proc)
    assert code == 0, out
    row = await state(db, "r1", "wifi")
    assert (row["desired"], row["observed"], row["last_request_id"]) == ("on", "on", "pay-1")
    assert "verified" in await events(db, msg), out


async def test_a_forged_queue_id_is_dead_lettered_and_never_freezes_the_key(db, dsn, tmp_path):
    """A msg_id far above the queue's sequence would make every later command "superseded"."""
    r1 = tmp_path / "r1.json"
    agentctl(dsn, "device", "add", "r1", "--driver", "sim", "--option", "initial=on", "--option", f"state_file={r1}")
    forge = ("INSERT INTO pgmq.q_device_tasks (msg_id, vt, message) OVERRIDING SYSTEM VALUE "
             "VALUES ($1, now(), $2::jsonb) RETURNING msg_id")
    body = json.dumps({"device": "r1", "service": "refresh-only", "action": "refresh"})
    assert await db.fetchval(forge, FORGED_ID, body) < FORGED_ID  # the insert is given an id of the sequence
    async with db.transaction():  # past the trigger, as only a superuser can: caught when read
        await db.execute("SET LOCAL session_replication_role = replica")
        await db.fetchval(forge, FORGED_ID, json.dumps({"device": "r1", "service": "wifi", "state": "on"}))
    proc = spawn_agentd(dsn, poll_interval=1)
    try:
        [entry] = await until(lambda: dlq(db), timeout=15, what="forged message dead-lettered")
        assert entry["message"] == {"device": "r1", "service": "wifi", "state": "on"}
        assert "not a real queue id" in entry["headers"]["reason"], entry
        msg = await db.fetchval("SELECT agent.enqueue('r1', 'wifi', 'off')")
        await until(lambda: archived(db, msg), timeout=15, what="legitimate command settled")
    finally:
        code, out = stop(proc)
    assert code == 0, out
    assert "superseded" not in await events(db, msg), out
    assert device_file(r1) == {"wifi": "off"}
    row = await state(db, "r1", "wifi")
    assert (row["desired"], row["observed"], row["desired_version"]) == ("off", "off", msg)


async def test_notify_wakeups_come_back_after_a_postgres_crash_without_restarting_agentd(cluster):
    dsn = cluster.dsn
    agentctl(dsn, "db", "init")
    agentctl(dsn, "device", "add", "r1", "--driver", "sim")
    port = free_port()
    proc = spawn_agentd(dsn, poll_interval=300, heartbeat_interval=1, http_listen=f"127.0.0.1:{port}")
    db = await asyncpg.connect(dsn)
    try:
        await until(lambda: ready(db), timeout=15, what="agentd ready")
        msg = await db.fetchval("SELECT agent.enqueue('r1', 'wifi', 'on')")
        await until(lambda: archived(db, msg), timeout=10, what="command applied before the crash")
        await db.close()

        cluster.stop("immediate")  # a crash: UNLOGGED tables, PGMQ's notify throttle among them, come back empty
        cluster.start()

        db = await asyncpg.connect(dsn)
        await until(lambda: db.fetchval(
            "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE application_name LIKE 'agentd session %') AND EXISTS "
            "(SELECT 1 FROM agent.agents WHERE state = 'ready' AND last_heartbeat > pg_postmaster_start_time())"),
            timeout=30, what="agentd reconnected (LISTEN back, heartbeat 'ready' after the restart)")
        before = await wakeups(port)
        msg = await db.fetchval("SELECT agent.enqueue('r1', 'wifi', 'off')")
        await until(lambda: archived(db, msg), timeout=10,
                    what="command applied after the crash: poll_interval is 300 s, so only a NOTIFY wake-up "
                         "can pick it up this fast; a timeout means insert notifications stayed off")
        after = await wakeups(port)
        woken = sum(after.get(s, 0) - before.get(s, 0) for s in ("notify", "connect"))
        assert woken >= 1, ("picked up by a poll or a read retry left over from the outage, not by a notification "
                            f"(insert notifications stayed off): wake-ups {before} -> {after}")
        assert await db.fetchval(
            "SELECT count(*) FROM pgmq.notify_insert_throttle WHERE queue_name = 'device_tasks'") == 1
    finally:
        await db.close()
        code, out = stop(proc)
    assert code == 0, out


async def wakeups(port: int) -> dict[str, float]:
    """agentd's consumer wake-ups by source, from /metrics."""
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/metrics") as resp:
        text = await resp.text()
    wakeups = r'^pgmq_edge_agent_wakeups_total\{source="(\w+)"\} (\S+)$'
    return {m[1]: float(m[2]) for m in re.finditer(wakeups, text, re.M)}


async def test_agentd_keeps_running_when_an_inventory_look_up_fails(db, dsn, worker_dsn):
    """r2 is not in agentd's cache, so the command makes it look r2 up, and that read is refused."""
    agentctl(dsn, "device", "add", "r1", "--driver", "sim")
    proc = spawn_agentd(worker_dsn, poll_interval=5)
    try:
        await until(lambda: ready(db), timeout=15, what="agentd (agent_worker member) ready")
        await db.execute("REVOKE SELECT ON agent.devices FROM agent_worker")
        agentctl(dsn, "device", "add", "r2", "--driver", "sim")
        msg = await db.fetchval("SELECT agent.enqueue('r2', 'wifi', 'on')")
        read_ct = "SELECT read_ct FROM pgmq.q_device_tasks WHERE msg_id = $1"
        await until(lambda: proc.poll() is not None or db.fetchval(f"SELECT ({read_ct}) >= 3", msg), timeout=20,
                    what="the look-up tried again (message read 3 times) or agentd exited")
        assert proc.poll() is None, f"agentd exited after a failed inventory look-up:\n{stop(proc)[1]}"
        assert not await archived(db, msg) and await dlq(db) == []  # neither done nor given up: retried
        await db.execute("GRANT SELECT ON agent.devices TO agent_worker")
        await until(lambda: archived(db, msg), timeout=15, what="command applied once the inventory is readable")
        assert proc.poll() is None
    finally:
        await db.execute("GRANT SELECT ON agent.devices TO agent_worker")
        code, out = stop(proc)
    assert code == 0, out
    assert (await state(db, "r2", "wifi"))["observed"] == "on"


async def report_failures(port: int) -> float:
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/metrics") as resp:
        text = await resp.text()
    found = re.search(r"^pgmq_edge_agent_report_failures_total (\S+)$", text, re.M)
    return float(found[1]) if found else 0.0


async def test_a_command_whose_state_row_is_locked_past_lock_timeout_is_verified_once_the_lock_goes(
        db, dsn, tmp_path):
    """The agent's role has lock_timeout (as DBAs set it); an operator's transaction holds the
    command's state row while the agent reports it. The command was applied and verified: it is
    recorded as such once the row is free, with its events, and never dead-lettered."""
    sim = tmp_path / "s1.json"
    agentctl(dsn, "device", "add", "s1", "--driver", "sim", "--option", "latency=0.5",
             "--option", f"state_file={sim}")
    async with login_role(dsn, "agent_worker") as name:
        await db.execute(f'ALTER ROLE "{name}" SET lock_timeout = \'200ms\'')
        port = free_port()
        proc = spawn_agentd(as_user(dsn, name), poll_interval=60, http_listen=f"127.0.0.1:{port}")
        locker = await asyncpg.connect(dsn)
        try:
            await until(lambda: ready(db), timeout=15, what="agentd ready")
            msg = await db.fetchval("SELECT agent.enqueue('s1', 'wifi', 'on', request_id => 'locked-1')")
            # accepted (desired written ahead of the device), the device not yet written (0.5 s a call)
            await until(lambda: db.fetchval("SELECT desired = 'on' FROM agent.service_state WHERE device = 's1'"),
                        timeout=10, interval=0.005, what="the command accepted")
            held = locker.transaction()
            await held.start()
            await locker.execute("SELECT 1 FROM agent.service_state WHERE device = 's1' FOR UPDATE")
            try:
                await until(lambda: report_failures(port), timeout=20, what="the report refused by the lock")
                assert device_file(sim) == {"wifi": "on"} and not await archived(db, msg)
            finally:
                await held.rollback()
            await until(lambda: archived(db, msg), timeout=30, what="the outcome recorded once the lock went")
        finally:
            await locker.close()
            code, out = stop(proc)
    assert code == 0, out
    assert await dlq(db) == [], out
    assert await events(db, msg) == ["verified"], out
    row = await state(db, "s1", "wifi")
    assert (row["observed"], row["desired_failed"]) == ("on", False)
