"""Coalescing a lane (pure): which items form a take, and the order its commands are judged in.

A take supersedes nothing by itself: every command of it is judged (expiry, then acceptance with its
duplicates) before an older one can be superseded, so the plan only keeps one delivery per message
and puts the commands in version order."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone

from agent.contract import Command
from agent.executor import coalesce
from agent.model.outcome import Delivery

T0 = datetime(2026, 11, 30, 23, 59, tzinfo=timezone.utc)


@dataclass
class Cmd:
    delivery: Delivery
    command: Command
    high = False

    @property
    def joins_take(self) -> bool:
        return self.command.action == "set"


@dataclass
class Other:
    """Lane work that is not a command (a reconcile message)."""

    delivery: Delivery
    joins_take = False
    high = False


def item(msg_id: int, service: str = "wifi", state: str = "on", *, read_ct: int = 1, version: int | None = None,
         action: str = "set") -> Cmd:
    body = {"device": "r1", "service": service, "action": action}
    if action == "set":
        body["state"] = state
    return Cmd(Delivery(msg_id, read_ct, T0, "{}", None, version or msg_id), Command(**body))


def ids(items: list) -> list[tuple[int, int]]:
    return [(it.delivery.msg_id, it.delivery.read_ct) for it in items]


def test_a_take_is_the_run_of_set_commands_at_the_head_of_the_lane():
    lane = [item(1), item(2, "voip"), item(3, action="refresh"), item(4)]
    assert coalesce.head(lane, 100) == 2


def test_a_take_stops_at_lane_work_that_is_not_a_command():
    lane = [item(1), Other(Delivery(2, 1, T0, "{}", None, 2)), item(3)]
    assert coalesce.head(lane, 100) == 1


def test_a_take_holds_at_most_the_bound():
    assert coalesce.head([item(n) for n in range(1, 11)], 4) == 4


def test_work_that_cannot_be_taken_together_is_a_take_of_one():
    assert coalesce.head([item(1, action="refresh"), item(2)], 100) == 1
    assert coalesce.head([Other(Delivery(1, 1, T0, "{}", None, 1))], 100) == 1


def test_every_command_of_a_take_is_judged_even_older_ones_for_the_same_service():
    on, off, again = item(1, state="on"), item(2, state="off"), item(3, state="on")
    p = coalesce.plan([on, off, again])
    assert p.commands == [on, off, again] and p.stale == []  # none superseded before acceptance


def test_commands_are_judged_in_version_order_not_in_lane_order():
    """A DLQ replay keeps its first msg_id as version: it is older than the commands read before it."""
    newer, replay = item(5, "wifi", "off"), item(9, "wifi", "on", version=2)
    p = coalesce.plan([newer, replay])
    assert p.commands == [replay, newer]


def test_a_replay_beside_its_original_is_judged_after_it():
    original, replay = item(4), item(7, version=4)
    assert coalesce.plan([replay, original]).commands == [original, replay]


def test_a_message_delivered_twice_in_one_take_is_kept_once_as_its_newest_delivery():
    first, second, other = item(1, read_ct=1), item(1, read_ct=2), item(2, "voip")
    p = coalesce.plan([first, other, second])
    assert ids(p.commands) == [(1, 2), (2, 1)]
    assert p.stale == [first]  # fenced out: the newer delivery reports


def test_a_take_of_one_is_that_command():
    one = item(42)
    assert coalesce.plan([one]) == coalesce.Plan([one], [])
