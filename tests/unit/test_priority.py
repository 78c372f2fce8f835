"""Restores first: the pure choices (a message's priority, the lane's next take)."""

from __future__ import annotations

import json

import pytest

from agent.executor import priority
from agent.executor.priority import HIGH, NORMAL
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
