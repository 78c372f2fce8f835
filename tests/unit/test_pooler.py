"""The verdict on a pooler in between, from the backends connections saw (the I/O is tested against a
real PgBouncer in tests/acceptance/test_pgbouncer.py)."""

from __future__ import annotations

from agent.db.pooler import shares_backend


def test_a_real_session_keeps_its_backend_and_nobody_else_gets_it():
    assert not shares_backend(5, [6, 7, 8, 9], 5)


def test_a_backend_another_connection_pinned_meanwhile_is_no_session():
    assert shares_backend(5, [5], 6)  # transaction pooling: the idle backend went to the next client


def test_a_connection_that_moved_to_another_backend_is_no_session():
    assert shares_backend(5, [6, 7], 8)  # round-robin pooling hands the noted backend out later
    assert shares_backend(5, [], 6)
