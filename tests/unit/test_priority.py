"""Restores first: the pure choices (a message's priority, the lane's next take)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone

import pytest

from agent.contract import Command
from agent.executor import coalesce
from agent.model import priority
from agent.model.outcome import Delivery
from agent.model.priority import HIGH, NORMAL
from agent.queue.admission import header_problem


@pytest.mark.parametrize(("value", "state", "expected"), [
    (None, "on", HIGH), (None, "off", NORMAL), (None, None, NORMAL),
    ("high", "off", HIGH), ("normal", "on", NORMAL), ("high", None, HIGH),
])
def test_a_commands_priority_is_its_header_else_high_for_a_restore(value, state, expected):
    assert priority.of(value, state) == expected


def test_the_header_is_read_from_an_object_only():
    assert priority.header(json.dumps({"priority": "high"})) == "high"
    assert priority.header(json.dumps(["priority"])) is None
    assert priority.header("not json") is None
    assert priority.header(None) is None


def test_a_priority_other_than_high_or_normal_is_refused_with_the_reason():
    assert header_problem(5, json.dumps({"priority": "urgent"})) == 'priority must be "high" or "normal"'
    assert header_problem(5, json.dumps({"priority": 1})) is not None
    assert header_problem(5, json.dumps({"priority": "normal"})) is None


# -- the lane's next take -------------------------------------------------------------------------

T0 = datetime(2026, 11, 30, 23, 59, tzinfo=timezone.utc)


@dataclass
class Cmd:
    delivery: Delivery
    command: Command

    @property
    def high(self) -> bool:
        return self.command.action == "set" and priority.of(self.delivery.priority, self.command.state) == HIGH

    @property
    def joins_take(self) -> bool:
        return self.command.action == "set"


@dataclass
class Other:
    delivery: Delivery
    joins_take = False
    high = False


def item(msg_id: int, service: str, state: str = "off", *, prio: str | None = None, action: str = "set") -> Cmd:
    body = {"device": "r1", "service": service, "action": action}
    if action == "set":
        body["state"] = state
    return Cmd(Delivery(msg_id, 1, T0, "{}", None, msg_id, priority=prio), Command(**body))


def pick(lane: list, bound: int = 100) -> list[int]:
    return [it.delivery.msg_id for it in coalesce.pick(lane, bound)]


def test_without_a_restore_waiting_the_take_is_the_head_of_the_lane():
    lane = [item(1, "a"), item(2, "b"), item(3, "c", action="refresh"), item(4, "d")]
    assert pick(lane) == [1, 2]


def test_a_waiting_restore_is_taken_before_the_suspensions_ahead_of_it():
    lane = [item(n, f"s{n}") for n in range(1, 6)] + [item(6, "x", "on")]
    assert pick(lane) == [6]


def test_a_restore_jumps_over_a_reconcile_message_and_a_refresh():
    lane = [Other(Delivery(1, 1, T0, "{}", None, 1)), item(2, "a", action="refresh"), item(3, "b", "on")]
    assert pick(lane) == [3]


def test_the_other_commands_for_a_restores_service_come_along_so_newest_wins_judges_them_together():
    older_off, other, restore, newer_off = item(1, "a"), item(2, "b"), item(3, "a", "on"), item(4, "a")
    assert pick([older_off, other, restore, newer_off]) == [1, 3, 4]


def test_the_priority_header_decides_over_the_state():
    lane = [item(1, "a", "on", prio="normal"), item(2, "b", "off", prio="high")]
    assert pick(lane) == [2]


def test_restores_taken_together_are_bounded():
    lane = [item(n, f"s{n}", "on") for n in range(1, 11)]
    assert pick(lane, 4) == [1, 2, 3, 4]


def test_commands_for_one_service_keep_their_order_within_the_bound():
    assert pick([item(1, "a"), item(2, "a", "on"), item(3, "a")], 2) == [1, 2]
    assert pick([item(1, "a"), item(2, "a", "on")], 1) == [1]


# -- bookkeeping: restores ahead of a burst's -------------------------------------------------------

async def test_the_reporter_commits_restores_outcomes_ahead_of_the_others_waiting():
    import asyncio

    from agent.model.outcome import Outcome
    from agent.queue.reports import Reporter

    batches: list[list[int]] = []
    reporter = Reporter(None, None, "a1", lambda _o, _l: None, max_batch=3)  # type: ignore[arg-type]

    async def commit(batch: list[Outcome]) -> None:
        batches.append([o.delivery.msg_id for o in batch])

    reporter._commit = commit  # type: ignore[method-assign]
    for n in range(1, 6):
        reporter.submit(Outcome(Delivery(n, 1, T0, "{}", None, n), "archive", urgent=n in (4, 5)))
    task = asyncio.create_task(reporter.run())
    await asyncio.wait_for(reporter.drained(), 5)
    task.cancel()
    assert batches == [[4, 5], [1, 2, 3]]


async def test_the_acceptor_flushes_a_restores_take_in_a_statement_of_its_own_first():
    import asyncio
    from contextlib import asynccontextmanager

    from agent.executor.acceptor import Acceptor

    flushes: list[list[int]] = []

    class Pool:
        @asynccontextmanager
        async def acquire(self):  # type: ignore[no-untyped-def]
            yield None

    acceptor = Acceptor(Pool(), None)  # type: ignore[arg-type]

    async def write(_conn, batch):  # type: ignore[no-untyped-def]
        flushes.append([p.msg_id for p in batch])
        return [(p.version, None) for p in batch]

    acceptor._write = write  # type: ignore[method-assign]
    cmd = Command(device="r1", service="a", state="off")
    futures = [acceptor.submit(cmd, n, n, urgent=n == 3) for n in (1, 2, 3)]
    task = asyncio.create_task(acceptor.run())
    await asyncio.wait_for(asyncio.gather(*futures), 5)
    task.cancel()
    assert flushes == [[3], [1, 2]]
