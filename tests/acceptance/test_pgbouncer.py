"""A real PgBouncer in transaction mode between agentd's pool and Postgres, for a whole scenario:
commands, retries, a crash, reconciliation. The session connections (LISTEN, the leader's lock)
bypass it through AGENT_SESSION_DATABASE_URL; the pool keeps no prepared statements."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from tests.support import pgbouncer
from tests.support.agents import agentctl, spawn_agentd
from tests.support.db import add_device, dlq
from tests.support.wait import until

pytestmark = [pytest.mark.acceptance,
              pytest.mark.skipif(not pgbouncer.available(), reason="needs pgbouncer: "
                                 "apt-get install -y --no-install-recommends pgbouncer")]


@pytest.fixture
def bouncer(pg_admin_dsn):
    b = pgbouncer.PgBouncer(pg_admin_dsn).start()
    yield b
    b.stop()


def _file(path: Path) -> dict[str, str]:
    try:
        return json.loads(path.read_text() or "{}")
    except (FileNotFoundError, ValueError):
        return {}


def settled(path: Path, want: dict[str, str]) -> bool:
    have = _file(path)
    return all(have.get(svc, "off") == st for svc, st in want.items())  # a sim service never set is off


async def test_the_whole_scenario_runs_through_pgbouncer_in_transaction_mode(db, dsn, bouncer, tmp_path):
    files = {d: tmp_path / f"{d}.json" for d in ("r1", "r2", "r3")}
    for d, f in files.items():
        await add_device(db, d, "sim", {"latency": 0.05, "state_file": str(f), "failure_rate": 0.3, "seed": 3})
    through = {"AGENT_DATABASE_URL": bouncer.dsn(dsn), "session_database_url": dsn, "statement_cache_size": 0,
               "pool_size": 4, "retry_base": 0.05, "retry_max": 0.3, "max_attempts": 30, "poll_interval": 2,
               "visibility_timeout": 3}
    want = {d: {f"s{i}": "on" if (i + n) % 2 else "off" for i in range(12)} for n, d in enumerate(files)}
    for d, services in want.items():
        for svc, st in services.items():
            agentctl(dsn, "enqueue", d, svc, st)
    first = spawn_agentd(dsn, agent_id="via-bouncer-1", **through)
    try:  # mid-way, the agent is killed; its successor finishes
        await until(lambda: sum(len(_file(f)) for f in files.values()) >= 6, timeout=30, what="work under way")
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate(timeout=10)
    second = spawn_agentd(dsn, agent_id="via-bouncer-2", **through)
    try:
        await until(lambda: all(settled(f, want[d]) for d, f in files.items()), timeout=90, interval=0.2,
                    what="every command applied through PgBouncer")
        await until(lambda: db.fetchval('SELECT count(*) = 0 FROM pgmq."q_device_tasks"'), timeout=30,
                    what="queue drained")
        drifted = {**_file(files["r1"]), "s0": "on" if want["r1"]["s0"] == "off" else "off"}
        files["r1"].write_text(json.dumps(drifted))  # someone changes the router by hand
        agentctl(dsn, "sync", "--device", "r1", "--timeout", "60")  # the leader (direct session) feeds it
        assert settled(files["r1"], want["r1"])
    finally:
        second.send_signal(signal.SIGTERM)
        out, _ = second.communicate(timeout=30)
    assert second.returncode == 0, out
    assert await dlq(db) == []
    assert "prepared statement" not in out, out
    retried = await db.fetchval("SELECT count(*) FROM agent.events WHERE kind = 'retried'")
    repaired = await db.fetchval("SELECT count(*) FROM agent.events WHERE kind = 'repaired'")
    assert retried > 0 and repaired == 1
