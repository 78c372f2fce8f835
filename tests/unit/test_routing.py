"""Routing decisions, pure: where a command for another site's device goes, and which site/queue
pairings an agent may start with."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest

from agent.db.schema import site_name_problem, site_problem
from agent.model.outcome import Delivery
from agent.model.sites import Elsewhere
from agent.queue.admission import header_problem
from agent.queue.routing import Move, moved_from, route

HERE = "device_tasks"


def delivery(headers: dict | None = None) -> Delivery:  # type: ignore[type-arg]
    return Delivery(41, 1, datetime.now(timezone.utc), "{}", json.dumps(headers) if headers is not None else None, 41)


def test_a_command_for_another_sites_device_moves_to_its_queue_marked_with_where_it_came_from():
    decision = route(delivery(), HERE, "default", Elsewhere("n1", "north", "north_tasks"))
    assert decision == Move("north_tasks", {"rerouted_from": {"queue": HERE, "site": "default", "msg_id": 41}})
    # (the copy's version, origin_msg_id, is written by agent.move_message: tests/integration/test_sites.py)


def test_a_message_moved_once_is_not_moved_again():
    marked = delivery({"rerouted_from": {"queue": "north_tasks", "site": "north", "msg_id": 7}})
    why = route(marked, HERE, "default", Elsewhere("n1", "south", "south_tasks"))
    assert isinstance(why, str) and "already moved once (from queue 'north_tasks')" in why


@pytest.mark.parametrize(("where", "says"), [
    (Elsewhere("n1", "west", None), "no queue recorded: run `agentctl db init --site west --queue <name>`"),
    (Elsewhere("n1", "west", "west_tasks", ready=False), "whose queue 'west_tasks' does not exist"),
    (Elsewhere("n1", "west", HERE), "whose queue is this one ('device_tasks'): run that site's agents with "
                                    "AGENT_SITE=west"),
])
def test_a_move_that_cannot_happen_is_a_dead_letter_reason_naming_the_fix(where, says):
    why = route(delivery(), HERE, "default", where)
    assert isinstance(why, str) and says in why and "device 'n1' belongs to site 'west'" in why


def test_the_mark_is_read_back_and_validated_like_the_agents_other_headers():
    assert moved_from(json.dumps({"rerouted_from": {"queue": "a"}})) == "a"
    assert moved_from(json.dumps({"x": 1})) is None and moved_from(None) is None
    assert header_problem(5, json.dumps({"rerouted_from": "a"})) == "rerouted_from must be an object naming the queue"
    assert header_problem(5, json.dumps({"rerouted_from": {"queue": "a", "msg_id": 3}})) is None


@pytest.mark.parametrize(("site", "queue", "says"), [
    ("north", "north_tasks", None),                 # recorded
    ("west", "west_tasks", None),                   # neither recorded: served as before
    ("north", HERE, "site 'north' (AGENT_SITE) records queue 'north_tasks': set AGENT_QUEUE=north_tasks"),
    ("west", "north_tasks", "AGENT_QUEUE 'north_tasks' is the queue of site 'north', not of 'west'"),
])
def test_an_agent_may_start_only_on_its_sites_queue(site, queue, says):
    rows = [(n, q) for n, q in [("default", HERE), ("north", "north_tasks")] if n == site or q == queue]
    problem = site_problem(site, queue, rows)
    assert problem == says if says is None else says in (problem or "")


def test_site_names_are_what_agent_site_accepts():
    assert site_name_problem("north-1 (Berlin)") is None
    assert "1 to 64" in (site_name_problem("") or "") and "1 to 64" in (site_name_problem("x" * 65) or "")
    assert "control" in (site_name_problem("a\nb") or "")
