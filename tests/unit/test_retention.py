from __future__ import annotations

from datetime import datetime, timedelta, timezone

from agent.db.retention import TABLES, Retention, cutoffs, go_on
from agent.settings import load_settings

NOW = datetime(2026, 3, 1, tzinfo=timezone.utc)


def test_each_table_has_its_own_cutoff():
    got = cutoffs(Retention(archive_days=14, dlq_days=90, events_days=180, requests_days=30, sync_runs_days=7,
                            agents_days=3), NOW)
    assert got == {"archive": NOW - timedelta(days=14), "dlq_archive": NOW - timedelta(days=14),
                   "dlq": NOW - timedelta(days=90), "events": NOW - timedelta(days=180),
                   "batches": NOW - timedelta(days=180),
                   "requests": NOW - timedelta(days=30), "sync_runs": NOW - timedelta(days=7),
                   "agents": NOW - timedelta(days=3)}


def test_zero_days_keeps_a_table_forever():
    assert set(cutoffs(Retention(0, 90, 0, 30, 7, agents_days=0), NOW)) == {"dlq", "requests", "sync_runs"}


def test_batches_go_on_only_while_full_and_within_the_budget():
    assert go_on(1000, 1000, 1, 50)
    assert not go_on(999, 1000, 1, 50)   # the last batch was short: nothing left
    assert not go_on(1000, 1000, 50, 50)  # budget spent: the next pass goes on
    assert go_on(1000, 1000, 10_000, None)  # `agentctl db prune`: until done


def test_defaults_suit_a_year_of_operation(monkeypatch):
    monkeypatch.setenv("AGENT_DATABASE_URL", "postgresql://agent@db/agent")
    r = Retention.from_settings(load_settings())
    assert (r.archive_days, r.dlq_days, r.events_days, r.requests_days, r.sync_runs_days) == (14, 90, 180, 30, 7)
    assert r.agents_days == 7  # a stale agent leaves the fleet view within a week
    assert r.batch == 1000 and r.interval == 600 and TABLES[0] == "archive"


def test_each_retention_setting_reaches_its_own_field():
    r = Retention.from_settings(load_settings(None, database_url="postgresql://agent@db/agent", retain_archive_days=1,
                                              retain_dlq_days=2, retain_events_days=3, retain_requests_days=4,
                                              reconcile_retention_days=5, prune_batch=6, prune_interval=7,
                                              retain_agents_days=8))
    assert r == Retention(archive_days=1, dlq_days=2, events_days=3, requests_days=4, sync_runs_days=5, batch=6,
                          interval=7, agents_days=8)
