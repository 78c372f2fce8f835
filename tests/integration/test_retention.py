"""Retention: pruning removes what the settings no longer keep, in batches, and keeps everything
else: new rows, the live queue, a dead letter someone holds, open sync runs, live agents."""

from __future__ import annotations

import asyncpg
import pytest

from agent.db import retention
from agent.db.queries import Queries
from agent.db.retention import Retention
from agent.db.schema import storage_options
from tests.support.agents import running_agent
from tests.support.cluster import as_user, login_role
from tests.support.wait import until

Q = Queries("device_tasks")
KEEP = Retention(archive_days=14, dlq_days=90, events_days=180, requests_days=30, sync_runs_days=7, batch=2)


async def old_and_new_rows(db: asyncpg.Connection) -> None:
    """For each table: 5 rows past its retention and 1 within it."""
    for table, days in (("a_device_tasks", 14), ("a_device_tasks_dlq", 14)):
        await db.execute(f"INSERT INTO pgmq.{table} (msg_id, read_ct, enqueued_at, archived_at, vt, message) "
                         "SELECT 100000 + i, 1, now() - make_interval(days => $1 + 1), "
                         "now() - make_interval(days => CASE WHEN i <= 5 THEN $1 + 1 ELSE $1 - 1 END), now(), '{}' "
                         "FROM generate_series(1, 6) i", days)
    await db.execute("INSERT INTO pgmq.q_device_tasks_dlq (enqueued_at, vt, message) SELECT "
                     "now() - make_interval(days => CASE WHEN i <= 5 THEN 91 ELSE 89 END), now(), '{}' "
                     "FROM generate_series(1, 6) i")
    await db.execute("INSERT INTO pgmq.q_device_tasks_dlq (enqueued_at, vt, message) "  # held by a replay now
                     "VALUES (now() - interval '200 days', now() + interval '1 minute', '{\"held\": true}')")
    await db.execute("INSERT INTO pgmq.q_device_tasks (enqueued_at, vt, message) "  # live queue: never pruned
                     "VALUES (now() - interval '400 days', now(), '{}')")
    await db.execute("INSERT INTO agent.events (at, kind) SELECT now() - make_interval(days => "
                     "CASE WHEN i <= 5 THEN 181 ELSE 179 END), 'verified' FROM generate_series(1, 6) i")
    await db.execute("INSERT INTO agent.batches (name, first_enqueued_at, last_settled_at) VALUES "
                     "('old', now() - interval '190 days', now() - interval '181 days'), "
                     "('open', now() - interval '190 days', now() - interval '181 days')")
    await db.execute("INSERT INTO agent.batch_commands (version, batch, enqueued_at, outcome, settled_at) "
                     "SELECT 200000 + i, CASE WHEN i <= 5 THEN 'old' ELSE 'open' END, now() - make_interval(days => "
                     "CASE WHEN i <= 5 THEN 185 ELSE 179 END), 'verified', now() - interval '181 days' "
                     "FROM generate_series(1, 6) i")  # 'open' had a command enqueued within retention
    await db.execute("INSERT INTO agent.requests (request_id, version, device, service, seen_at) "
                     "SELECT 'r' || i, i, 'd', 's', now() - make_interval(days => CASE WHEN i <= 5 THEN 31 ELSE 29 END)"
                     " FROM generate_series(1, 6) i")
    await db.execute("INSERT INTO agent.sync_runs (site, kind, requested_at, finished_at) SELECT 'default', "
                     "'manual', now() - interval '30 days', CASE WHEN i <= 5 THEN now() - interval '8 days' "
                     "WHEN i = 6 THEN now() - interval '6 days' END FROM generate_series(1, 7) i")
    # agents: stopped or gone silent 8 days ago (5), one stopped 6 days ago, one beating now
    await db.execute("INSERT INTO agent.agents (agent_id, site, queue, host, version, started_at, last_heartbeat, "
                     "state) SELECT 'gw' || i, 'default', 'device_tasks', 'h', '0', now() - interval '30 days', "
                     "CASE WHEN i <= 5 THEN now() - interval '8 days' WHEN i = 6 THEN now() - interval '6 days' "
                     "ELSE now() END, CASE WHEN i IN (1, 2, 6) THEN 'stopped' ELSE 'ready' END "
                     "FROM generate_series(1, 7) i")


async def counts(db: asyncpg.Connection) -> dict[str, int]:
    tables = {"archive": "pgmq.a_device_tasks", "dlq_archive": "pgmq.a_device_tasks_dlq",
              "dlq": "pgmq.q_device_tasks_dlq", "queue": "pgmq.q_device_tasks", "events": "agent.events",
              "requests": "agent.requests", "sync_runs": "agent.sync_runs", "agents": "agent.agents",
              "batches": "agent.batch_commands"}
    return {k: await db.fetchval(f"SELECT count(*) FROM {t}") for k, t in tables.items()}


async def test_a_prune_removes_what_is_past_retention_and_keeps_the_rest(db):
    await old_and_new_rows(db)
    removed = await retention.prune(db, Q, KEEP, pause=0)
    assert removed == {"archive": 5, "dlq_archive": 5, "dlq": 5, "events": 5, "batches": 5, "requests": 5,
                       "sync_runs": 5, "agents": 5}
    assert await counts(db) == {"archive": 1, "dlq_archive": 1, "dlq": 2, "queue": 1, "events": 1, "requests": 1,
                                "sync_runs": 2, "agents": 2, "batches": 1}
    assert await db.fetchval("SELECT array_agg(agent_id ORDER BY agent_id) FROM agent.agents") == ["gw6", "gw7"]
    assert await db.fetchval("SELECT array_agg(name) FROM agent.batches") == ["open"]  # 'old' went with its commands
    assert await db.fetchval("SELECT count(*) FROM pgmq.q_device_tasks_dlq WHERE message ? 'held'") == 1


async def test_a_pass_stops_at_its_budget_and_the_next_goes_on(db):
    await old_and_new_rows(db)
    assert (await retention.prune(db, Q, KEEP, max_batches=1, pause=0))["events"] == 2  # one batch of 2
    assert (await retention.prune(db, Q, KEEP, max_batches=1, pause=0))["events"] == 2
    assert (await retention.prune(db, Q, KEEP, max_batches=1, pause=0))["events"] == 1


async def test_a_dry_run_counts_and_removes_nothing(db):
    await old_and_new_rows(db)
    before = await counts(db)
    assert await retention.due(db, Q, KEEP) == {"archive": 5, "dlq_archive": 5, "dlq": 5, "events": 5,
                                                "batches": 5, "requests": 5, "sync_runs": 5, "agents": 5}
    assert await counts(db) == before


async def test_a_table_kept_forever_is_left_alone(db):
    await old_and_new_rows(db)
    removed = await retention.prune(db, Q, Retention(0, 0, 0, 0, 7, agents_days=0), pause=0)
    assert removed == {"sync_runs": 5}
    assert (await counts(db))["events"] == 6


async def test_the_audit_log_cannot_be_emptied_through_the_prune_function(db):
    await old_and_new_rows(db)
    with pytest.raises(asyncpg.InvalidParameterValueError, match="younger than a day"):
        await db.fetchval("SELECT agent.prune_audit('events', now(), 1000)")


async def test_agent_worker_may_prune(db, dsn):
    await old_and_new_rows(db)
    async with login_role(dsn, "agent_worker") as name:
        worker = await asyncpg.connect(as_user(dsn, name))
        try:
            removed = await retention.prune(worker, Q, KEEP, "default", pause=0)
            stats = await retention.table_stats(worker, Q)
        finally:
            await worker.close()
    assert set(removed.values()) == {5}
    assert stats["events"][0] > 0 and 179 * 86400 < stats["events"][1] < 180 * 86400  # type: ignore[operator]


async def test_the_leader_prunes_and_exports_table_figures(db, dsn):
    await old_and_new_rows(db)
    async with running_agent(dsn, prune_interval=3600) as agent:
        await until(lambda: agent.reconciler.tables, timeout=15, what="a prune pass and table figures")
        assert await db.fetchval("SELECT count(*) FROM agent.events WHERE at < now() - interval '180 days'") == 0
        assert await db.fetchval("SELECT count(*) FROM pgmq.a_device_tasks WHERE msg_id > 100000") == 1
        assert not await db.fetchval("SELECT count(*) FROM agent.agents WHERE agent_id = 'gw1'")  # stopped 8 days ago
        live = agent.house.live()
        assert set(live.tables) == {"queue", "archive", "dlq", "dlq_archive", "events", "requests", "sync_runs"}


async def test_db_init_tunes_autovacuum_of_the_tables_that_churn(db):
    for table, options in storage_options(Q).items():
        got = await db.fetchval("SELECT reloptions FROM pg_class WHERE oid = $1::regclass", table)
        assert set(options.replace(" ", "").split(",")) <= set(got), table
