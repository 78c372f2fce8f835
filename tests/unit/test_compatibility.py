from __future__ import annotations

from agent.db.schema import compatibility


def test_the_same_schema_runs():
    assert compatibility(6, 6, 5) is None


def test_an_older_agent_within_the_range_the_database_serves_runs():
    assert compatibility(5, 6, 5) is None
    assert compatibility(5, 7, 5) is None


def test_an_older_agent_below_the_minimum_is_told_to_upgrade_itself_not_the_database():
    msg = compatibility(4, 6, 5)
    assert msg is not None and "upgrade agentd" in msg and "schema >= 5" in msg and "cannot help" in msg


def test_a_database_without_a_recorded_minimum_serves_only_its_own_version():
    assert compatibility(4, 5, None) is not None and compatibility(5, 5, None) is None


def test_a_newer_agent_is_told_to_migrate_the_database():
    msg = compatibility(7, 6, 5)
    assert msg is not None and "run `agentctl db init`" in msg and "--print-sql" in msg and "schema 5 and newer" in msg
