"""LISTEN agent_state: one notification per changed row of agent.service_state, with the payload
the contract gives, also when one statement changes many rows (an acceptance inserts a take's
rows, a report updates them) and when one statement both inserts and updates."""

from __future__ import annotations

import json

import asyncpg

from agent.db.queries import Queries
from tests.support.db import add_device
from tests.support.wait import until

Q = Queries("device_tasks")
KEYS = {"device", "service", "desired", "observed", "version", "request_id", "error"}


def columns(rows: list[tuple[str, str, int]]) -> str:
    """The acceptance's JSON columns for (service, state, version) of device r1, without request ids."""
    return json.dumps([["r1"] * len(rows), [s for s, _st, _v in rows], [st for _s, st, _v in rows],
                       [v for _s, _st, v in rows], [v for _s, _st, v in rows], [None] * len(rows),
                       [False] * len(rows)])


async def test_each_row_a_statement_changes_is_announced_once(db, dsn):
    await add_device(db, "r1", "sim")
    heard: list[dict[str, object]] = []
    listener = await asyncpg.connect(dsn)
    try:
        await listener.add_listener("agent_state", lambda *a: heard.append(json.loads(a[3])))
        guard_off = ("default", None, 10.0, 3600.0)
        await db.fetch(Q.accept, columns([(f"s{i}", "on", 10 + i) for i in range(5)]), *guard_off)  # 5 inserts
        await until(lambda: len(heard) == 5, what="five notifications for five inserted rows")
        # one statement: two rows updated (newer versions), one inserted
        await db.fetch(Q.accept, columns([("s0", "off", 20), ("s1", "off", 21), ("s9", "on", 22)]), *guard_off)
        await until(lambda: len(heard) == 8, what="three more: two updated rows and one inserted")
        await db.execute("UPDATE agent.service_state SET observed = 'off', last_error = repeat('x', 300) "
                         "WHERE service IN ('s0', 's1')")
        await until(lambda: len(heard) == 10, what="a plain UPDATE of two rows: two notifications")
    finally:
        await listener.close()
    assert all(set(n) == KEYS for n in heard)
    assert sorted((n["service"], n["desired"], n["version"]) for n in heard[:5]) == \
        [(f"s{i}", "on", 10 + i) for i in range(5)]
    assert sorted((n["service"], n["desired"], n["version"]) for n in heard[5:8]) == \
        [("s0", "off", 20), ("s1", "off", 21), ("s9", "on", 22)]
    assert sorted(str(n["service"]) for n in heard[8:]) == ["s0", "s1"]
    assert all(n["observed"] == "off" and n["error"] == "x" * 200 for n in heard[8:])  # bounded as before
    assert {n["device"] for n in heard} == {"r1"} and all(n["request_id"] is None for n in heard)


async def test_a_statement_that_changes_no_row_announces_nothing(db, dsn):
    await add_device(db, "r1", "sim")
    heard: list[str] = []
    listener = await asyncpg.connect(dsn)
    try:
        await listener.add_listener("agent_state", lambda *a: heard.append(a[3]))
        await db.execute("UPDATE agent.service_state SET observed = 'on' WHERE device = 'nobody'")
        await db.execute("INSERT INTO agent.service_state (device, service, desired) VALUES ('r1', 'mark', 'on')")
        await until(lambda: heard, what="the marker's notification")
    finally:
        await listener.close()
    assert [json.loads(h)["service"] for h in heard] == ["mark"]  # nothing came before it


HOSTILE = ['plain', 'quo"te', 'back\\slash', 'tab\there', 'nl\nx', 'bell\x07', 'ünï©ødé ✓', '\u2028sep', "it's",
           '{"json": [1]}', 'x' * 300]


async def test_payloads_are_the_text_json_build_object_makes_also_for_hostile_text(db, dsn):
    """What producers parsed before schema 18 (json_build_object's text), character for character:
    escaping, nulls, bounds and the time format, for agent_state and agent_outcome."""
    await add_device(db, "r1", "sim")
    states: list[str] = []
    outcomes: list[str] = []
    listener = await asyncpg.connect(dsn)
    try:
        await listener.add_listener("agent_state", lambda *a: states.append(a[3]))
        await listener.add_listener("agent_outcome", lambda *a: outcomes.append(a[3]))
        for i, text in enumerate(HOSTILE):
            await db.execute("INSERT INTO agent.service_state (device, service, desired, desired_version, "
                             "last_request_id, last_error) VALUES ('r1', $1, $2, $3, $4, $5)",
                             f"s{i}", None if i % 3 == 0 else "on", i, text if i % 2 else None, text)
        await db.execute("INSERT INTO agent.events (device, service, kind, msg_id, version, request_id, error, "
                         "agent_id) SELECT 'r1', 's' || i, 'dead_lettered', 1000 + i, 1000 + i, r, r, 'a' "
                         "FROM unnest($1::text[]) WITH ORDINALITY AS u(r, i)", HOSTILE)
        await until(lambda: len(states) == len(HOSTILE) and len(outcomes) == len(HOSTILE), what="every payload")
    finally:
        await listener.close()
    made = await db.fetch(
        "SELECT json_build_object('device', device, 'service', service, 'desired', desired, 'observed', observed, "
        "'version', desired_version, 'request_id', last_request_id, 'error', left(last_error, 200))::text AS p "
        "FROM agent.service_state ORDER BY desired_version")
    assert states == [r["p"] for r in made]
    made = await db.fetch(
        "SELECT json_build_object('version', version, 'msg_id', msg_id, 'kind', kind, 'device', left(device, 128), "
        "'service', left(service, 200), 'request_id', left(request_id, 200), 'error', left(error, 500), "
        "'at', to_char(at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'))::text AS p "
        "FROM agent.events ORDER BY id")
    assert outcomes == [r["p"] for r in made]
    assert all(json.loads(p) for p in states + outcomes)
