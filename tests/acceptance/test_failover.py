"""Failover: a multi-host DSN finds the primary, and when the primary dies and its synchronous
standby is promoted, the same agentd reconnects by itself, without spinning, and every command
still ends verified exactly once, at its newest state.

A real primary and a real streaming standby (tests/support/standby.py), a real agentd, simulated
devices whose state the test reads from their state files.
"""

from __future__ import annotations

import json
import random
import signal
import socket
import subprocess
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from tests.support import standby
from tests.support.agents import agentctl, spawn_agentd
from tests.support.db import add_device, dlq, send
from tests.support.standby import ReplicatedPair
from tests.support.wait import until

pytestmark = [pytest.mark.acceptance,
              pytest.mark.skipif(not standby.available(), reason="pg_basebackup (pgserver wheel) is missing")]

DATABASE = "agent"
DEVICES = ["r1", "r2", "r3"]
SERVICES = ["wifi", "voip", "tv"]
KEYS = [(d, s) for d in DEVICES for s in SERVICES]
FINAL = {"verified", "superseded", "duplicate", "refreshed", "expired", "dead_lettered"}  # ends a delivery
# While the primary is gone (the session connection backing off through four attempts, ~3-8 s), the
# agent must not spin: a tight retry loop logs or connects hundreds of times in that window.
RECONNECT_ACTIONS = {"listener_lost", "listener_retry", "db_pool_failing", "read_failed"}
RECONNECT_LINES = 20     # session connection and pool: lost, each retry (debug), pool failing, read failed
FAILURE_LINES = 40       # every other warning or error not about one command (reports, claims, heartbeat)
CONNECTIONS = 80         # connections the agent made to the standby (each rejected: it is read-only); each
                         # user of the pool (two report writers, the acceptance, reads, heartbeat) backs off on
                         # its own: 44 were seen on a loaded machine, spinning makes hundreds
METRIC = "pgmq_edge_agent_"
SETTINGS = {"log_format": "json", "log_level": "DEBUG", "poll_interval": 30, "visibility_timeout": 4,
            "retry_base": 0.05, "retry_max": 0.5, "heartbeat_interval": 5}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Agentd:
    """agentd as a subprocess, its output collected line by line while it runs, its /status and
    /metrics at hand."""

    def __init__(self, dsn: str, **settings: Any) -> None:
        self.url = f"http://127.0.0.1:{_free_port()}"
        self.proc = spawn_agentd(dsn, http_listen=self.url.removeprefix("http://"), **{**SETTINGS, **settings})
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def alive(self) -> bool:
        if self.proc.poll() is not None:
            self._reader.join(10)
            raise AssertionError(f"agentd exited ({self.proc.returncode}):\n" + "\n".join(self.lines[-60:]))
        return True

    def records(self, start: int = 0, end: int | None = None) -> list[dict[str, Any]]:
        """Its JSON log records (a line that is not one, a traceback, comes as its text)."""
        out = []
        for line in self.lines[start:end]:
            try:
                out.append(json.loads(line))
            except ValueError:
                out.append({"level": "error", "action": "-", "msg": line})
        return out

    async def _get(self, path: str) -> tuple[int, str] | None:
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
                async with http.get(self.url + path) as resp:
                    return resp.status, await resp.text()
        except (aiohttp.ClientError, TimeoutError):
            return None

    async def status(self) -> dict[str, Any] | None:
        self.alive()
        got = await self._get("/status")
        if got is None:
            return None
        code, body = got
        assert code == 200, f"/status answered {code}: {body}\nagentd said:\n" + "\n".join(self.lines[-40:])
        return json.loads(body)  # type: ignore[no-any-return]

    async def metric(self, name: str, labels: str = "") -> float | None:
        self.alive()
        got = await self._get("/metrics")
        assert got is not None and got[0] == 200, got
        for line in got[1].splitlines():
            key, _, value = line.rpartition(" ")
            if key == METRIC + name + (f"{{{labels}}}" if labels else ""):
                return float(value)
        return None

    async def healthy(self) -> dict[str, Any] | None:
        snap = await self.status()
        return snap if snap is not None and snap["healthy"] else None

    async def reconnecting(self) -> dict[str, Any] | None:
        """The /status snapshot once it says the agent is reconnecting."""
        snap = await self.status()
        return snap if snap is not None and not snap["healthy"] and "reconnecting" in snap["status"] else None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._reader.join(10)


@pytest.fixture
async def pair():
    pair = ReplicatedPair()
    try:
        await pair.start()
        conn = await asyncpg.connect(pair.primary.dsn())
        try:
            await conn.execute(f'CREATE DATABASE "{DATABASE}"')
        finally:
            await conn.close()
        yield pair
    finally:
        pair.close()


@pytest.fixture
def agents():
    """Start agentd with `agents.append(Agentd(...))`; each is stopped before the clusters go."""
    started: list[Agentd] = []
    try:
        yield started
    finally:
        for agent in started:
            agent.stop()


async def _devices(conn: asyncpg.Connection, tmp_path: Path) -> dict[str, Path]:
    files = {d: tmp_path / f"{d}.json" for d in DEVICES}
    for d in DEVICES:
        await add_device(conn, d, "sim", {"latency": 0.05, "state_file": str(files[d])})
    return files


def _device_state(path: Path) -> dict[str, str]:
    try:
        return json.loads(path.read_text() or "{}")  # type: ignore[no-any-return]
    except (FileNotFoundError, ValueError):
        return {}


class Commands:
    """What the producer sent: every msg_id with its key and state, and the newest per key."""

    def __init__(self, seed: int) -> None:
        self._rng = random.Random(seed)
        self.sent: dict[int, tuple[tuple[str, str], str]] = {}
        self.newest: dict[tuple[str, str], tuple[int, str]] = {}

    async def send(self, conn: asyncpg.Connection, n: int, keys: list[tuple[str, str]], tag: str) -> None:
        for i in range(n):
            (device, service), state = keys[i % len(keys)], self._rng.choice(["on", "off"])
            msg = await send(conn, {"device": device, "service": service, "state": state,
                                    "request_id": f"{tag}-{i}"})
            self.sent[msg] = ((device, service), state)
            self.newest[(device, service)] = (msg, state)

    async def settled(self, conn: asyncpg.Connection, files: dict[str, Path]) -> bool:
        """The queue is empty and every device holds the newest state sent for each service."""
        left = await conn.fetchval('SELECT count(*) FROM pgmq."q_device_tasks"')
        return left == 0 and all(_device_state(files[d]).get(s, "off") == state
                                 for (d, s), (_msg, state) in self.newest.items())


async def _archived(conn: asyncpg.Connection, msg: int) -> bool:
    return await conn.fetchval('SELECT EXISTS (SELECT 1 FROM pgmq."a_device_tasks" WHERE msg_id = $1)', msg)


async def _started(dsn: str, agents: list[Agentd], agent_id: str,
                   tmp_path: Path) -> tuple[asyncpg.Connection, dict[str, Path], Agentd]:
    """`agentctl db init`, three sim devices, agentd ready: (the producer's connection, the
    devices' state files, the agent)."""
    agentctl(dsn, "db", "init")
    producer = await asyncpg.connect(dsn)
    files = await _devices(producer, tmp_path)
    agent = Agentd(dsn, agent_id=agent_id)
    agents.append(agent)
    await until(agent.healthy, timeout=20, interval=0.1, what="agentd ready")
    return producer, files, agent


def _standby_connections(log_tail: str) -> int:
    """Connections the agent's processes made to a server, from its log_connections lines."""
    return sum(1 for line in log_tail.splitlines()
               if "connection authorized" in line and "application_name=agentd" in line)


def _outage_lines(records: list[dict[str, Any]]) -> tuple[list[str], list[str]]:
    """(reconnect lines of the session connection and the pool, other failed-statement lines): the
    actions of what the outage made the agent log. Per-command lines (with a msg_id) are neither."""
    reconnects, failures = [], []
    for rec in records:
        action = str(rec.get("action", ""))
        if action in RECONNECT_ACTIONS:
            reconnects.append(action)
        elif rec.get("level") in ("warning", "error", "critical") and "msg_id" not in rec:
            failures.append(action)
    return reconnects, failures


async def _primary_dies(pair: ReplicatedPair, agent: Agentd) -> None:
    """Stop the primary hard; until the standby is promoted the agent says it is reconnecting, and
    backs off instead of spinning while it retries against the standby, which refuses writes."""
    mark, standby_mark = len(agent.lines), pair.standby.log.stat().st_size
    pair.primary.stop("immediate")
    down = await until(agent.reconnecting, timeout=20, interval=0.1, what="/status saying it is reconnecting")
    assert await agent.metric("database_up") == 0, down
    lost_at = await agent.metric("listener_reconnects_total")
    assert lost_at is not None and lost_at >= 1
    await until(lambda: _gt(agent.metric("listener_reconnects_total"), lost_at + 3), timeout=30, interval=0.5,
                what="four more attempts to reconnect while only the standby is up")
    reconnects, failures = _outage_lines(agent.records(mark, len(agent.lines)))
    assert len(reconnects) < RECONNECT_LINES, Counter(reconnects)
    assert len(failures) < FAILURE_LINES, Counter(failures)
    connections = _standby_connections(pair.standby.log.read_bytes()[standby_mark:].decode(errors="replace"))
    assert connections < CONNECTIONS, f"{connections} connections to the standby while the primary was gone"


async def test_agent_reconnects_after_failover_and_every_command_ends_verified_once(pair, agents, tmp_path):
    dsn = pair.dsn(DATABASE)
    producer, files, agent = await _started(dsn, agents, "failover-1", tmp_path)
    commands = Commands(seed=14)
    try:
        await commands.send(producer, 45, KEYS, "before")  # five per key: newest wins
        await until(lambda: producer.fetchval("SELECT count(*) >= 6 FROM agent.events WHERE kind = 'verified'"),
                    timeout=20, what="commands flowing")
    finally:
        await producer.close()

    await _primary_dies(pair, agent)
    pair.standby.promote()

    producer = await asyncpg.connect(dsn)  # the same DSN: now the standby's port answers read-write
    try:
        assert await producer.fetchval("SELECT inet_server_port()") == pair.standby.port
        await commands.send(producer, 18, KEYS[:6], "after")  # the last three keys keep their pre-failover state
        await until(lambda: commands.settled(producer, files), timeout=30, interval=0.2,
                    what="every command settled on the devices")
        up = await until(agent.healthy, timeout=20, interval=0.1, what="/status healthy again")
        assert agent.alive()  # the same process reconnected by itself
        assert await agent.metric("database_up") == 1, up
        await _assert_each_command_ended_once(producer, commands)
        await _assert_woken_by_notification(agent, producer, files)
    finally:
        await producer.close()


async def _gt(value: Any, than: float) -> bool:
    got = await value
    return got is not None and got > than


async def _assert_each_command_ended_once(conn: asyncpg.Connection, commands: Commands) -> None:
    """One final outcome per message (verified, or superseded by a newer one; the newest verified),
    written at most once and never after a newer command; each archived once; no dead letters;
    Postgres holds the newest state of every key as desired and observed."""
    rows = await conn.fetch("SELECT msg_id, array_agg(kind ORDER BY id) AS kinds, "
                            "count(*) FILTER (WHERE applied_at IS NOT NULL OR kind = 'applied') AS writes "
                            "FROM agent.events WHERE msg_id = ANY($1::bigint[]) GROUP BY msg_id", list(commands.sent))
    kinds = {r["msg_id"]: list(r["kinds"]) for r in rows}
    writes = {r["msg_id"]: r["writes"] for r in rows}
    newest = {msg for msg, _state in commands.newest.values()}
    for msg, (key, state) in commands.sent.items():
        ended = [k for k in kinds.get(msg, []) if k in FINAL]
        assert ended in ([["verified"]] if msg in newest else [["verified"], ["superseded"]]), \
            f"msg {msg} {key} -> {state}: events {kinds.get(msg)}"
        assert writes[msg] <= 1, f"msg {msg} {key} written twice: {kinds[msg]}"
    await _assert_written_in_order(conn)
    archived = await conn.fetch('SELECT msg_id, count(*) AS n FROM pgmq."a_device_tasks" GROUP BY msg_id')
    assert {r["msg_id"]: r["n"] for r in archived} == dict.fromkeys(commands.sent, 1)
    assert await dlq(conn) == []
    rows = await conn.fetch("SELECT device, service, desired, observed FROM agent.service_state")
    assert {(r["device"], r["service"]): (r["desired"], r["observed"]) for r in rows} == \
        {key: (state, state) for key, (_msg, state) in commands.newest.items()}


async def _assert_written_in_order(conn: asyncpg.Connection) -> None:
    """Per key, the device was written by commands in the order they were sent (msg_id order)."""
    applied = await conn.fetch("SELECT device, service, msg_id, coalesce(applied_at, at) AS written FROM agent.events "
                               "WHERE applied_at IS NOT NULL OR kind = 'applied' ORDER BY written, id")
    assert applied, "no write recorded"
    versions: dict[tuple[str, str], list[int]] = {}
    for r in applied:
        versions.setdefault((r["device"], r["service"]), []).append(r["msg_id"])
    for key, ids in versions.items():
        assert ids == sorted(ids), f"{key} written out of order: {ids}"


async def _assert_woken_by_notification(agent: Agentd, conn: asyncpg.Connection, files: dict[str, Path]) -> None:
    """LISTEN is back on the new primary and its insert notifications are on again (promotion
    empties PGMQ's UNLOGGED throttle table): a new command wakes the agent, no poll needed."""
    notified = await agent.metric("wakeups_total", 'source="notify"')
    assert notified is not None
    state = "off" if _device_state(files["r3"]).get("tv", "off") == "on" else "on"
    msg = await send(conn, {"device": "r3", "service": "tv", "state": state, "request_id": "after-notify"})
    await until(lambda: _archived(conn, msg), timeout=10, what="a command after the failover verified")
    assert _device_state(files["r3"])["tv"] == state
    assert await _gt(agent.metric("wakeups_total", 'source="notify"'), notified)


async def test_a_standby_listed_first_is_passed_over_for_the_primary(pair, agents, tmp_path):
    """target_session_attrs=read-write: agentctl and agentd skip the standby that comes first."""
    producer, files, agent = await _started(pair.dsn(DATABASE, first=pair.standby), agents, "standby-first",
                                            tmp_path)
    try:
        assert await producer.fetchval("SELECT inet_server_port()") == pair.primary.port
        msg = await send(producer, {"device": "r1", "service": "wifi", "state": "on", "request_id": "first"})
        await until(lambda: _archived(producer, msg), timeout=10, what="the command verified")
        assert _device_state(files["r1"]) == {"wifi": "on"}
        assert await producer.fetchval("SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'agentd%'")
        assert await agent.healthy()
    finally:
        await producer.close()
    assert _standby_connections(pair.standby.log_text()) > 0  # asked first, and passed over
    on_standby = await asyncpg.connect(pair.standby.dsn())
    try:
        assert await on_standby.fetchval("SELECT pg_is_in_recovery()")
    finally:
        await on_standby.close()


async def test_agent_waits_out_a_moment_when_no_host_accepts_writes(pair, agents, tmp_path):
    """The old primary comes back read-only before the standby is promoted (a demoted leader): every
    host answers, none is writable. The agent keeps retrying and carries on once one is."""
    dsn = pair.dsn(DATABASE)
    producer, files, agent = await _started(dsn, agents, "demoted-1", tmp_path)
    commands = Commands(seed=15)
    try:
        await commands.send(producer, 3, KEYS[:3], "before")
        await until(lambda: commands.settled(producer, files), timeout=10, what="the first commands done")
    finally:
        await producer.close()

    pair.primary.stop("immediate")
    pair.primary.demote()
    await until(agent.reconnecting, timeout=20, interval=0.1, what="/status saying it is reconnecting")
    lost_at = await agent.metric("listener_reconnects_total")
    assert lost_at is not None
    await until(lambda: _gt(agent.metric("listener_reconnects_total"), lost_at + 1), timeout=20, interval=0.5,
                what="two attempts to reconnect while both hosts are read-only")
    pair.primary.stop("immediate")
    pair.standby.promote()

    producer = await asyncpg.connect(dsn)
    try:
        await commands.send(producer, 6, KEYS[:6], "after")
        await until(lambda: commands.settled(producer, files), timeout=30, interval=0.2,
                    what="every command settled on the devices")
        await until(agent.healthy, timeout=20, interval=0.1, what="/status healthy again")
        await _assert_each_command_ended_once(producer, commands)
    finally:
        await producer.close()
