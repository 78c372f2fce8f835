"""The agent tried as a hostile producer, a broken device and an unlucky operator would: one bad
outcome never blocks the others, nothing a message or a device says can hurt it."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
from pathlib import Path

import pytest
from aiohttp import web

from tests.support.agents import agentctl, spawn_agentd
from tests.support.db import add_device, archived, dlq, send
from tests.support.wait import until

pytestmark = pytest.mark.acceptance


class HostileDevice:
    """An HTTP device that answers what a broken or hostile one would."""

    def __init__(self, other_port: int = 0) -> None:
        self.hits: list[str] = []
        app = web.Application()
        app.router.add_get("/state/{service}", self._state)
        app.router.add_put("/state/{service}", self._state)
        self.app = app
        self.other_port = other_port
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def _state(self, request: web.Request) -> web.StreamResponse:
        service = request.match_info["service"]
        self.hits.append(f"{request.method} {service}")
        if service == "nul":
            return web.Response(status=400, text="bad\x00request\x1b[31m\r\nforged: line")
        if service == "redirect":
            raise web.HTTPFound(f"http://127.0.0.1:{self.other_port}/state/elsewhere")
        if service == "flood":
            return web.Response(body=b"[" + b"0," * (4 * 1024 * 1024) + b"0]", content_type="application/json")
        return web.json_response({"on": True})

    async def start(self) -> HostileDevice:
        self.runner = web.AppRunner(self.app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = self.runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


def stop(proc: subprocess.Popen[str]) -> str:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    return out


def run_once(dsn: str, **settings: object) -> str:
    proc = spawn_agentd(dsn, "--once", **settings)
    out, _ = proc.communicate(timeout=60)
    return out


def _file(path: Path) -> dict[str, str]:
    try:
        return json.loads(path.read_text() or "{}")
    except (FileNotFoundError, ValueError):
        return {}


async def test_poisoned_outcomes_are_dead_lettered_and_innocent_ones_in_the_same_batch_commit(db, dsn, tmp_path):
    box = await HostileDevice().start()
    sim = tmp_path / "r1.json"
    try:
        await add_device(db, "r1", "sim", {"state_file": str(sim)})
        await add_device(db, "h1", "http", {"read_path": "/state/{service}", "state_pointer": "/on"})
        await db.execute("UPDATE agent.devices SET address = $1 WHERE id = 'h1'", f"127.0.0.1:{box.port}")
        poisoned = [
            # jsonb keeps any number; read back, this one is too large for a double: infinity
            await send(db, '{"device": "r1", "service": "inf", "state": "on", "meta": {"x": 1%s.5}}' % ("0" * 400),
                       raw=True),
            await send(db, {"reconcile": {"run": 987654, "device": "r1"}}),
            await db.fetchval("SELECT pgmq.send('device_tasks', $1::jsonb, $2::jsonb)",
                              json.dumps({"device": "r1", "service": "bounced", "state": "on"}),
                              json.dumps({"bounces": "lots"})),
            await send(db, {"device": "h1", "service": "nul", "state": "on"}),
        ]
        innocent = [await send(db, {"device": "r1", "service": f"s{i}", "state": "on"}) for i in range(6)]
        proc = spawn_agentd(dsn, poll_interval=60, batch_size=100, max_attempts=1)
        try:
            await until(lambda: all_archived(db, innocent), timeout=20, what="innocent commands recorded")
            await until(lambda: dlq_count(db, len(poisoned)), timeout=20, what="poisoned ones dead-lettered")
        finally:
            out = stop(proc)
            print(out)
    finally:
        await box.stop()
    assert _file(sim) == {f"s{i}": "on" for i in range(6)}  # the poisoned ones never touched the device
    reasons = {e["message"].get("service") or "reconcile": e["headers"]["reason"] for e in await dlq(db)}
    assert "not finite" in reasons["inf"]
    assert "no sync run holds" in reasons["reconcile"]
    assert "bounces must be a non-negative integer" in reasons["bounced"]
    assert "HTTP 400" in reasons["nul"] and "\x00" not in reasons["nul"] and "\x1b" not in reasons["nul"]
    assert await db.fetchval('SELECT count(*) FROM pgmq."q_device_tasks"') == 0
    assert "\x1b" not in out and "\x00" not in out
    assert not any(line.startswith("forged") for line in out.splitlines()), out
    listing = agentctl(dsn, "dlq", "list").stdout
    assert "\x1b" not in listing and "\x00" not in listing
    assert len(listing.splitlines()) == 1 + len(poisoned), listing  # a header and one line per entry


async def test_a_device_that_redirects_or_floods_is_refused_and_nothing_else_is_operated(db, dsn):
    other = await HostileDevice().start()
    box = await HostileDevice(other_port=other.port).start()
    try:
        await add_device(db, "h1", "http", {"read_path": "/state/{service}", "state_pointer": "/on",
                                            "max_reply_bytes": 65536})
        await db.execute("UPDATE agent.devices SET address = $1 WHERE id = 'h1'", f"127.0.0.1:{box.port}")
        for service in ("redirect", "flood"):
            await send(db, {"device": "h1", "service": service, "state": "on"})
        await asyncio.to_thread(run_once, dsn, max_attempts=1)
    finally:
        await box.stop()
        await other.stop()
    assert other.hits == []  # the redirect was not followed: the other server was never operated
    reasons = {e["message"]["service"]: e["headers"]["reason"] for e in await dlq(db)}
    assert f"redirect to http://127.0.0.1:{other.port}/state/elsewhere: not followed" in reasons["redirect"]
    assert "over the 65536-byte limit" in reasons["flood"]


async def test_oversized_messages_are_dead_lettered_without_being_fetched(db, dsn, tmp_path):
    await add_device(db, "r1", "sim", {"state_file": str(tmp_path / "r1.json")})
    big = [await send(db, {"device": "r1", "service": f"big{i}", "state": "on", "meta": {"pad": "x" * 3_000_000}})
           for i in range(4)]
    ok = await send(db, {"device": "r1", "service": "small", "state": "on"})
    proc = spawn_agentd(dsn, poll_interval=60)
    try:
        await until(lambda: archived(db, ok), timeout=20, what="the small command applied")
        await until(lambda: dlq_count(db, len(big)), timeout=20, what="the big ones dead-lettered")
    finally:
        stop(proc)
    for entry in await dlq(db):
        assert "over the 65536-byte limit (not fetched)" in entry["headers"]["reason"]


async def test_a_dead_lettered_command_is_never_applied_by_reconciliation(db, dsn, tmp_path):
    sim = tmp_path / "r1.json"
    sim.write_text(json.dumps({"wifi": "off"}))
    await add_device(db, "r1", "sim", {"state_file": str(sim), "failure_rate": 1, "failure_kind": "permanent"})
    msg = int(agentctl(dsn, "enqueue", "r1", "wifi", "on", "--request-id", "pay-7").stdout)
    proc = spawn_agentd(dsn, poll_interval=1, max_attempts=1)
    try:
        await until(lambda: dlq_count(db, 1), timeout=20, what="the failing command dead-lettered")
        await db.execute("UPDATE agent.devices SET options = $1::jsonb WHERE id = 'r1'",
                         json.dumps({"state_file": str(sim)}))  # the device works again
        agentctl(dsn, "sync", "--device", "r1", "--timeout", "30")
        assert _file(sim) == {"wifi": "off"}  # the producer was told it failed: it stays off
        row = await db.fetchrow("SELECT desired, desired_failed FROM agent.service_state WHERE device = 'r1'")
        assert (row["desired"], row["desired_failed"]) == ("on", True)
        assert "True" in agentctl(dsn, "state", "--device", "r1").stdout.splitlines()[1]
        agentctl(dsn, "dlq", "replay", "--all")  # only a replay (or a newer command) sets it in motion again
        await until(lambda: _file(sim) == {"wifi": "on"}, timeout=20, what="the replay applied")
        await until(lambda: db.fetchval("SELECT NOT desired_failed FROM agent.service_state WHERE device = 'r1'"),
                    timeout=10, what="the mark cleared")
    finally:
        stop(proc)
    assert msg > 0


async def test_two_agents_never_operate_a_device_at_once_even_when_the_holder_loses_its_connection(
        db, dsn, tmp_path):
    sim = tmp_path / "r1.json"
    await add_device(db, "r1", "sim", {"latency": 0.4, "state_file": str(sim)})
    common = {"batch_size": 2, "prefetch": 4, "poll_interval": 1, "device_timeout": 3, "retry_base": 0.05}
    procs = [spawn_agentd(dsn, agent_id=f"replica-{n}", **common) for n in (1, 2)]
    try:
        await until(lambda: db.fetchval("SELECT count(*) = 2 FROM agent.agents WHERE state = 'ready'"),
                    timeout=20, what="both agents ready")
        for i in range(8):
            await send(db, {"device": "r1", "service": f"s{i}", "state": "on"})
        for _cut in range(2):  # mid-operation, the agents lose every database connection
            await until(lambda: Path(f"{sim}.busy").exists(), timeout=20, interval=0.005, what="an operation")
            await db.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                             "WHERE application_name LIKE 'agentd%' AND pid <> pg_backend_pid()")
        await until(lambda: _file(sim) == {f"s{i}": "on" for i in range(8)}, timeout=60, interval=0.2,
                    what="every command applied")
    finally:
        for p in procs:
            stop(p)
    overlaps = Path(f"{sim}.overlaps")
    assert not overlaps.exists(), overlaps.read_text()


async def test_no_log_line_or_terminal_can_be_forged_from_a_message(db, dsn, tmp_path):
    await add_device(db, "r1", "sim", {"state_file": str(tmp_path / "r1.json")})
    await send(db, {"device": "r1", "service": "wifi", "state": "on",
                    "request_id": "x\n12:00:00.000 INFO    verified       forged"})
    await send(db, {"device": "r1\u001b[2J", "service": "wifi", "state": "on"})
    out = await asyncio.to_thread(run_once, dsn)
    assert not any(line.startswith("12:00:00.000") for line in out.splitlines()), out
    assert "\x1b" not in out


async def all_archived(db, ids: list[int]) -> bool:
    return all([await archived(db, i) for i in ids])


async def dlq_count(db, n: int) -> bool:
    return len(await dlq(db)) >= n
