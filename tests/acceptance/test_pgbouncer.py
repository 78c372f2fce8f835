"""A real PgBouncer in transaction mode between agentd's pool and Postgres, for a whole scenario:
commands, retries, a crash, reconciliation. The session connections (LISTEN, the leader's lock)
bypass it through AGENT_SESSION_DATABASE_URL (or go through a PgBouncer in session mode); the pool
keeps no prepared statements. Set up otherwise, agentd refuses to start and names the setting."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import asyncpg
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


@pytest.fixture
def session_bouncer(pg_admin_dsn):
    b = pgbouncer.PgBouncer(pg_admin_dsn, pool_mode="session").start()
    yield b
    b.stop()


def exited(proc: subprocess.Popen[str]) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate(timeout=10)
        raise AssertionError(f"agentd kept running: {out[-3000:]}") from None
    return proc.returncode, out


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


def test_agentd_refuses_to_start_when_its_session_connection_goes_through_transaction_pooling(dsn, bouncer):
    """No AGENT_SESSION_DATABASE_URL: the session connection (the leader's lock, LISTEN) would take
    AGENT_DATABASE_URL, through PgBouncer in transaction mode: two leaders, lost wake-ups."""
    code, out = exited(spawn_agentd(dsn, AGENT_DATABASE_URL=bouncer.dsn(dsn), statement_cache_size=0))
    assert code == 2, out
    assert "not a real session" in out and "AGENT_SESSION_DATABASE_URL" in out and "pool_mode=session" in out, out
    assert "Traceback" not in out


def test_agentd_refuses_a_session_url_that_reaches_pgbouncer_in_transaction_mode(dsn, bouncer):
    code, out = exited(spawn_agentd(dsn, session_database_url=bouncer.dsn(dsn)))
    assert code == 2, out
    assert "AGENT_SESSION_DATABASE_URL" in out and "pool_mode=session" in out and "Traceback" not in out, out


def test_agentd_refuses_a_statement_cache_that_transaction_pooling_cannot_keep(dsn, bouncer):
    """asyncpg's statement cache on (the default), the pool through PgBouncer without prepared statement
    support: every pooled statement would fail with "prepared statement ... already exists"."""
    code, out = exited(spawn_agentd(dsn, AGENT_DATABASE_URL=bouncer.dsn(dsn), session_database_url=dsn))
    assert code == 2, out
    assert "prepared statements do not survive" in out and "AGENT_STATEMENT_CACHE_SIZE=0" in out, out
    assert "max_prepared_statements" in out and "Traceback" not in out


async def test_a_session_through_pgbouncer_in_session_mode_is_a_real_session_and_leads(db, dsn, bouncer,
                                                                                       session_bouncer, tmp_path):
    await add_device(db, "r1", "sim", {"state_file": str(tmp_path / "r1.json")})
    agent = spawn_agentd(dsn, AGENT_DATABASE_URL=bouncer.dsn(dsn), session_database_url=session_bouncer.dsn(dsn),
                         statement_cache_size=0, reconcile_schedule="60")
    try:
        agentctl(dsn, "enqueue", "r1", "wifi", "on")
        await until(lambda: settled(tmp_path / "r1.json", {"wifi": "on"}), timeout=30, what="the command applied")
        await until(lambda: db.fetchval("SELECT count(*) > 0 FROM pg_locks WHERE locktype = 'advisory' AND granted"),
                    timeout=30, what="the leader's lock, held on the session through PgBouncer")
    finally:
        agent.send_signal(signal.SIGTERM)
        out, _ = agent.communicate(timeout=30)
    assert agent.returncode == 0, out
    assert "leading reconciliation" in out, out


async def test_pgbouncer_runs_as_the_test_clusters_user_whatever_postgres_ps_lists_first(pg_admin_dsn, dsn, tmp_path,
                                                                                         monkeypatch):
    """On a machine where another Postgres runs as another OS user, `ps` may list that one first: a
    PgBouncer run as that user gets "Permission denied" on the test cluster's socket, and every test
    through it fails with "database unreachable ()". Its user is taken from the test cluster itself."""
    if os.geteuid() != 0:
        pytest.skip("PgBouncer runs as the invoking user when not root: no user to choose")
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "ps").write_text("#!/bin/sh\necho daemon\nexec /bin/ps \"$@\"\n")  # another cluster's user, listed first
    (fake / "ps").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")
    b = pgbouncer.PgBouncer(pg_admin_dsn).start()
    try:
        conn = await asyncpg.connect(b.dsn(dsn), statement_cache_size=0, timeout=15)
        try:
            assert await conn.fetchval("SELECT 1") == 1
        finally:
            await conn.close()
    finally:
        b.stop()
