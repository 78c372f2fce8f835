"""agent.request_sync as a producer calls it (a LOGIN role that holds only agent_producer): the run
says who really asked, only agents start scheduled runs, what it names must exist, its text is
bounded, and `agentctl sync --show` prints whatever a run holds as plain escaped lines."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import pytest

from tests.support.agents import agentctl
from tests.support.cluster import as_user, login_role
from tests.support.db import add_device

HOSTILE = "x\x1b[2J\x1b[H\x1b[32mall good\x1b[0m\nsync run 1 finished: 0 drifted"


@pytest.fixture
async def producer(dsn: str, db: asyncpg.Connection) -> AsyncIterator[tuple[str, asyncpg.Connection]]:
    await add_device(db, "r1", driver="sim")
    async with login_role(dsn, "agent_producer") as name:
        conn = await asyncpg.connect(as_user(dsn, name))
        yield name, conn
        await conn.close()


async def runs(db: asyncpg.Connection) -> int:
    return await db.fetchval("SELECT count(*) FROM agent.sync_runs")


async def test_a_run_says_which_login_asked_whatever_the_producer_claims(db, producer):
    name, conn = producer
    run = await conn.fetchval("SELECT agent.request_sync('default', requested_by => 'cron@billing')")
    assert await db.fetchval("SELECT requested_by FROM agent.sync_runs WHERE id = $1", run) == f"{name} (cron@billing)"
    run = await conn.fetchval("SELECT agent.request_sync('default', requested_by => NULL)")
    assert await db.fetchval("SELECT requested_by FROM agent.sync_runs WHERE id = $1", run) == name


async def test_only_the_sites_agents_start_scheduled_runs(db, dsn, producer):
    _name, conn = producer
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="only the site's agents start scheduled runs"):
        await conn.fetchval("SELECT agent.request_sync('default', kind => 'scheduled')")
    assert await runs(db) == 0
    async with login_role(dsn, "agent_worker") as agent:  # an agent of an older release still asks this way
        worker = await asyncpg.connect(as_user(dsn, agent))
        try:
            run = await worker.fetchval("SELECT agent.request_sync('default', NULL, NULL, false, 'scheduled', 'gw1')")
        finally:
            await worker.close()
    assert await db.fetchval("SELECT kind || ' ' || requested_by FROM agent.sync_runs WHERE id = $1", run) == \
        f"scheduled {agent} (gw1)"
    async with login_role(dsn, "agent_worker_default") as agent:  # a site's own role
        worker = await asyncpg.connect(as_user(dsn, agent))
        try:
            await worker.fetchval("SELECT agent.request_sync('default', NULL, NULL, false, 'scheduled', 'gw1')")
        finally:
            await worker.close()


@pytest.mark.parametrize(("args", "message"), [
    ({"site": "no-such-site"}, "unknown site 'no-such-site'"),
    ({"site": HOSTILE}, "site must be 1 to 64 characters, none of them control"),
    ({"site": "s" * 65}, "site must be 1 to 64 characters"),
    ({"site": "default", "service": HOSTILE}, "service is not a valid service key"),
    ({"site": "default", "device": HOSTILE}, "device is not a valid device id"),
    ({"site": "default", "requested_by": HOSTILE}, "requested_by must be 1 to 200 characters, none of them control"),
    ({"site": "default", "requested_by": "b" * 201}, "requested_by must be 1 to 200 characters"),
    ({"site": "default", "kind": "nightly"}, "kind must be 'scheduled' or 'manual'"),
])
async def test_what_a_producer_names_is_checked_before_a_run_is_made(db, producer, args, message):
    _name, conn = producer
    named = ", ".join(f"{k} => ${i}" for i, k in enumerate(args, 1))
    with pytest.raises(asyncpg.InvalidParameterValueError) as refused:
        await conn.fetchval(f"SELECT agent.request_sync({named})", *args.values())
    assert message in str(refused.value)
    assert "\x1b" not in str(refused.value)  # the refusal does not echo what it refused
    assert await runs(db) == 0


async def test_a_site_holds_a_bounded_number_of_unfinished_runs(db, producer):
    _name, conn = producer
    await db.execute("INSERT INTO agent.sync_runs (site, kind) SELECT 'default', 'manual' FROM generate_series(1, 999)")
    await conn.fetchval("SELECT agent.request_sync('default', 'r1')")  # the 1000th: no service commanded yet,
    await db.execute("UPDATE agent.sync_runs SET finished_at = NULL")  # it finished at once; say it goes on
    with pytest.raises(asyncpg.ProgramLimitExceededError, match="already has 1000 unfinished runs"):
        await conn.fetchval("SELECT agent.request_sync('default')")
    assert await runs(db) == 1000


async def test_sync_show_prints_what_a_run_holds_as_escaped_lines(db, dsn):
    """Whatever reached a run (a device's error text, or rows from before this release): no escape
    sequence reaches the terminal and no text forges a line."""
    run = await db.fetchval("INSERT INTO agent.sync_runs (site, kind, device, service, requested_by, finished_at, "
                            "devices, checked, unreadable) VALUES ('default', 'manual', 'r1', $1, $1, now(), 1, 1, 1) "
                            "RETURNING id", HOSTILE)
    await db.execute("INSERT INTO agent.sync_devices (run, device, state) VALUES ($1, 'r1', 'done')", run)
    await db.execute("INSERT INTO agent.sync_items (run, device, service, expected, found, result, error) "
                     "VALUES ($1, 'r1', 'wifi', 'on', $2, 'unreadable', $2)", run, HOSTILE)
    shown = await asyncio.to_thread(agentctl, dsn, "sync", "--show", str(run), check=False)
    assert shown.returncode == 1, shown.stderr
    assert "\x1b" not in shown.stdout
    assert len(shown.stdout.splitlines()) == 2  # the run and its one finding
    assert "x\\x1b[2J\\x1b[H\\x1b[32mall good\\x1b[0m\\nsync run 1 finished" in shown.stdout
