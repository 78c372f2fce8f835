from __future__ import annotations

import json
import random
from datetime import datetime, timedelta, timezone

import asyncpg
import pytest

from agent.contract import Command
from agent.executor.policy import KeyState, RetryPolicy, Verdict, decide
from agent.model.headers import command_version
from agent.model.outcome import StateUpdate
from agent.queue.reports import merge_states, report_failure

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=timezone.utc)


def cmd(**kw) -> Command:
    return Command(**{"device": "r1", "service": "wifi", "state": "on", **kw})


def test_newer_command_converges():
    assert decide(cmd(), 10, KeyState(5, "off"), None, NOW) is Verdict.CONVERGE


def test_redelivery_of_the_accepted_command_converges_again():
    assert decide(cmd(), 10, KeyState(10, "on"), None, NOW) is Verdict.CONVERGE


def test_older_command_is_superseded():
    assert decide(cmd(), 4, KeyState(10, "off"), None, NOW) is Verdict.SUPERSEDED


def test_request_id_seen_on_another_command_is_a_duplicate():
    assert decide(cmd(request_id="a"), 11, KeyState(10), 10, NOW) is Verdict.DUPLICATE
    assert decide(cmd(request_id="a"), 10, KeyState(10), 10, NOW) is Verdict.CONVERGE


def test_expired_command_is_not_run():
    assert decide(cmd(not_after=NOW - timedelta(seconds=1)), 11, KeyState(), None, NOW) is Verdict.EXPIRED
    assert decide(cmd(not_after=NOW + timedelta(seconds=1)), 11, KeyState(), None, NOW) is Verdict.CONVERGE


def test_refresh_is_never_superseded():
    assert decide(cmd(action="refresh", state=None), 1, KeyState(10), None, NOW) is Verdict.REFRESH


def test_version_is_the_origin_msg_id_after_a_replay():
    assert command_version(50, json.dumps({"origin_msg_id": 7})) == 7
    assert command_version(50, None) == 50
    assert command_version(50, json.dumps({"origin_msg_id": 99})) == 50  # cannot be newer than itself
    assert command_version(50, "not json") == 50


@pytest.mark.parametrize("attempt, low, high", [(1, 0.5, 1.0), (2, 1.0, 2.0), (4, 4.0, 8.0), (20, 30.0, 60.0)])
def test_backoff_grows_exponentially_with_jitter_and_a_cap(attempt, low, high):
    policy = RetryPolicy(max_attempts=5, base=1.0, cap=60.0)
    delays = [policy.delay(attempt, random.Random(seed)) for seed in range(200)]
    assert low <= min(delays) and max(delays) <= high
    assert len(set(delays)) > 100  # jittered


def test_attempts_are_exhausted_at_the_limit():
    policy = RetryPolicy(max_attempts=3)
    assert not policy.exhausted(2) and policy.exhausted(3)


def test_merged_state_keeps_the_newest_desired_and_the_latest_observation():
    t1, t2 = NOW, NOW + timedelta(seconds=1)
    merged = merge_states([
        StateUpdate("r1", "wifi", "on", 5, "on", t1, error=None),
        StateUpdate("r1", "wifi", "off", 3, observed="off", observed_at=t2, error="x"),
        StateUpdate("r1", "lan", "on", 6),
    ])
    by_key = {(m.device, m.service): m for m in merged}
    wifi = by_key[("r1", "wifi")]
    assert (wifi.desired, wifi.version, wifi.observed, wifi.observed_at, wifi.error) == ("on", 5, "off", t2, "x")
    assert [(m.device, m.service) for m in merged] == [("r1", "lan"), ("r1", "wifi")]  # in key order: lock order


def test_merged_states_come_in_key_order_whatever_order_the_outcomes_came_in():
    keys = [("r2", "a"), ("r1", "b"), ("r10", "a"), ("r1", "a")]
    merged = merge_states([StateUpdate(d, s, "on", 1) for d, s in keys])
    assert [(m.device, m.service) for m in merged] == sorted(keys)


@pytest.mark.parametrize(("error", "meaning"), [
    (asyncpg.LockNotAvailableError("canceling statement due to lock timeout"), "unavailable"),  # 55P03
    (asyncpg.ReadOnlySQLTransactionError("cannot execute INSERT in a read-only transaction"), "unavailable"),
    (asyncpg.AdminShutdownError("terminating connection"), "unavailable"),  # 57P01
    (asyncpg.QueryCanceledError("canceling statement due to statement timeout"), "unavailable"),
    (asyncpg.ConnectionDoesNotExistError("connection was closed"), "unavailable"),  # 08003
    (asyncpg.TooManyConnectionsError("too many"), "unavailable"),  # 53300
    (asyncpg.SerializationError("could not serialize"), "unavailable"),
    (asyncpg.DeadlockDetectedError("deadlock"), "unavailable"),
    (asyncpg.InterfaceError("connection is closed"), "unavailable"),
    (ConnectionResetError(), "unavailable"),
    (TimeoutError(), "unavailable"),
    (asyncpg.CheckViolationError("violates check constraint"), "data"),  # 23514
    (asyncpg.UntranslatableCharacterError("\\u0000 cannot be converted"), "data"),  # 22P05
    (asyncpg.ProgramLimitExceededError("total size of jsonb array elements exceeds the maximum"), "data"),
    (asyncpg.exceptions._base.DataError("invalid input for query argument $1"), "data"),
    (ValueError("Out of range float values are not JSON compliant"), "data"),
    (asyncpg.InsufficientPrivilegeError("permission denied for table service_state"), "refused"),
    (asyncpg.RaiseError("a trigger said no"), "refused"),
    (RuntimeError("a bug"), None),
])
def test_a_failed_report_is_retried_unless_the_database_refuses_its_data(error, meaning):
    """Lock timeouts, read-only transactions mid-failover, shutdowns and lost connections are
    unavailability (retry the same outcomes); only classes 22, 23 and 54 say the data is refused."""
    assert report_failure(error) == meaning


def test_an_off_the_guard_holds_is_held_unless_a_newer_command_supersedes_it():
    off = cmd(state="off")
    assert decide(off, 10, KeyState(5, "on"), None, NOW, held=True) is Verdict.HELD
    assert decide(off, 4, KeyState(10, "on"), None, NOW, held=True) is Verdict.SUPERSEDED
    assert decide(off, 10, KeyState(5, "on"), None, NOW) is Verdict.CONVERGE


def test_only_a_command_an_operator_released_passes_the_guard():
    from agent.model.headers import released

    assert released('{"guard": "released", "bounces": 1}')
    assert not released('{"guard": "held"}') and not released(None) and not released('["guard"]')
    assert not released('{"guard": "released"')  # not JSON


def test_percent_100_turns_the_guard_off():
    from agent.executor.acceptor import GuardLimits

    assert GuardLimits("north", 100, 10.0, 3600.0).args() == ("north", 100, 10.0, 3600.0)
    assert GuardLimits("north", 100, 100.0, 3600.0).args()[1] is None
