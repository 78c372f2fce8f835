"""The guard against mass suspension with the real agentd and Postgres: a billing job that marks most
of a site unpaid has at most the limit applied, the rest held for an operator, who releases or
discards them with agentctl. Full scale (2,000 services on, 1,500 suspensions) on zero-latency sim
devices: it runs in well under a minute. (agentd logs at WARNING: a line per command would fill the
pipe the test reads only at the end.)"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import urllib.request
from pathlib import Path

import asyncpg
import pytest

from tests.support.agents import agentctl, spawn_agentd
from tests.support.db import add_device
from tests.support.wait import until

pytestmark = pytest.mark.acceptance

DEVICES = [f"bras-{d:02}" for d in range(20)]
SERVICES = [(dev, f"pppoe:c{d * 100 + i:04}") for d, dev in enumerate(DEVICES) for i in range(100)]  # 2,000
HELD = "SELECT count(*) FROM pgmq.q_device_tasks WHERE headers->>'guard' = 'held'"


def _offs(tmp_path: Path) -> set[tuple[str, str]]:
    """The services the devices have off (their state files)."""
    out = set()
    for dev in DEVICES:
        path = tmp_path / f"{dev}.json"
        doc = json.loads(path.read_text() or "{}") if path.exists() else {}
        out |= {(dev, svc) for svc, st in doc.items() if st == "off"}
    return out


async def _send(db: asyncpg.Connection, keys: list[tuple[str, str]], state: str) -> None:
    async with db.transaction():  # one burst, as a billing job sends it
        for dev, svc in keys:
            await db.execute("SELECT agent.enqueue($1, $2, $3)", dev, svc, state)


async def _settled(db: asyncpg.Connection) -> bool:
    """Nothing left to do but what is held: every other message is settled."""
    return await db.fetchval("SELECT count(*) FROM pgmq.q_device_tasks "
                             "WHERE coalesce(headers->>'guard', '') <> 'held'") == 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _held_gauge(listen: str) -> float | None:
    def scrape() -> str:
        with urllib.request.urlopen(f"http://{listen}/metrics", timeout=5) as resp:
            return resp.read().decode()

    for line in (await asyncio.to_thread(scrape)).splitlines():
        if line.startswith('pgmq_edge_agent_guard_held_commands{site="default"} '):
            return float(line.rpartition(" ")[2])
    return None


async def _held_is(db: asyncpg.Connection, n: int) -> bool:
    return await db.fetchval(HELD) == n and await _settled(db)


async def _kinds(db: asyncpg.Connection, kind: str, state: str | None = None) -> int:
    return await db.fetchval("SELECT count(*) FROM agent.events WHERE kind = $1 AND ($2::text IS NULL OR desired = $2)",
                             kind, state)


async def test_a_mass_suspension_is_held_past_the_limit_until_an_operator_releases_or_discards_it(db, dsn, tmp_path):
    for dev in DEVICES:
        await add_device(db, dev, "sim", {"initial": "on", "state_file": str(tmp_path / f"{dev}.json")})
    await db.execute("INSERT INTO agent.service_state (device, service, desired, observed) "
                     "SELECT x.d, x.s, 'on', 'on' FROM unnest($1::text[], $2::text[]) AS x(d, s)",
                     [d for d, _ in SERVICES], [s for _, s in SERVICES])  # a site in steady state: 2,000 on
    first, second = SERVICES[:1500], SERVICES[1500:]
    listen = f"127.0.0.1:{_free_port()}"
    proc = spawn_agentd(dsn, poll_interval=1, log_level="WARNING", http_listen=listen)
    try:
        await _send(db, first, "off")  # the billing bug: 1,500 of 2,000 unpaid
        await until(lambda: _settled(db), timeout=60, what="the suspensions applied or held")
        # the limit: max(AGENT_GUARD_OFF_MIN 100, 10 % of 2,000 on) = 200, exactly
        assert len(_offs(tmp_path)) == 200 == await _kinds(db, "verified", "off")
        assert await db.fetchval(HELD) == 1300 == await _kinds(db, "held")
        status = json.loads(agentctl(dsn, "guard", "status", "--json", check=False).stdout)
        assert (status["held"], status["turned_off"], status["limit"]) == (1300, 200, 200)
        assert sum(d["held"] for d in status["devices"]) == 1300 and status["oldest_held_since"] is not None
        said = agentctl(dsn, "guard", "status", check=False)
        assert said.returncode == 1 and "1300 command(s) held" in said.stdout
        assert "limit 200 (of 2000 on)" in said.stdout
        async def gauge_says_1300() -> bool:  # sampled every 10 s at most
            return await _held_gauge(listen) == 1300

        await until(gauge_says_1300, timeout=30, interval=0.5, what="pgmq_edge_agent_guard_held_commands 1300")
        assert "1300 HELD by the guard" in agentctl(dsn, "status", "--fleet", check=False).stdout

        # customers pay meanwhile: restores are never held, whether their suspension was applied or held
        applied = sorted(_offs(tmp_path))[:5]
        held = [k for k in first if k not in set(_offs(tmp_path))][:5]
        await _send(db, applied + held, "on")
        await until(lambda: _settled(db), timeout=30, what="the restores")
        assert not set(applied + held) & _offs(tmp_path)
        assert await _kinds(db, "verified", "on") == 10
        # newest wins: the 5 held suspensions the restores superseded end as such, no longer held
        await until(lambda: _held_is(db, 1295), timeout=30, what="the superseded held commands settled")
        assert await _kinds(db, "superseded") == 5

        proc.send_signal(signal.SIGTERM)  # a restart loses nothing: held commands wait in the queue
        assert proc.wait(30) == 0
        proc = spawn_agentd(dsn, poll_interval=1, log_level="WARNING")
        assert await db.fetchval(HELD) == 1295

        out = agentctl(dsn, "guard", "release").stdout
        assert "released 1295 held command(s)" in out
        await until(lambda: db.fetchval("SELECT count(*) = 0 FROM pgmq.q_device_tasks"), timeout=60,
                    what="the released commands settled")
        # every released command still newest is applied; the 5 whose customer paid meanwhile are not
        assert _offs(tmp_path) == set(first) - set(applied + held)
        assert await _kinds(db, "superseded") == 5  # none more
        who = [r["error"] for r in await db.fetch("SELECT DISTINCT error FROM agent.events WHERE kind = 'released'")]
        assert len(who) == 1 and who[0].startswith("released by ") and "(os user " in who[0]
        assert await _kinds(db, "released") == 1295

        # an hour later (the window and the lift are over): a second round, which the operator discards
        await db.execute("UPDATE agent.guard_offs SET at = at - interval '2 hours'")
        await db.execute("UPDATE agent.guard_sites SET lifted_until = now() - interval '1 second'")
        before = _offs(tmp_path)
        await _send(db, second, "off")
        await until(lambda: _settled(db), timeout=60, what="the second round applied or held")
        # 510 on (the 500 left and the 10 restored): the limit is AGENT_GUARD_OFF_MIN, 100
        assert len(_offs(tmp_path) - before) == 100
        assert await db.fetchval(HELD) == 400
        out = agentctl(dsn, "guard", "discard").stdout
        assert "discarded 400 held command(s)" in out
        assert await db.fetchval("SELECT count(*) FROM pgmq.q_device_tasks") == 0
        assert len(_offs(tmp_path) - before) == 100  # none of the discarded applied
        assert await _kinds(db, "discarded") == 400
        status = json.loads(agentctl(dsn, "guard", "status", "--json").stdout)
        assert status["held"] == 0
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert "Traceback" not in out, out
