"""A producer follows one command to its end, logged in as a member of agent_producer only:
agent.command_status(msg_id) says where it is, LISTEN agent_outcome announces every settled command,
and agent.enqueue's SQLSTATE says whether to fix the call, drop the command or retry later."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from agent.db.queries import Queries
from agent.db.schema import init_database
from agent.errors import PermanentError, TransientError
from agent.ops import admin
from tests.support.agents import running_agent
from tests.support.cluster import connected_as, listening
from tests.support.db import add_device
from tests.support.devices import ScriptedDriver
from tests.support.wait import until


@pytest.fixture
async def producer(dsn: str, db: asyncpg.Connection) -> AsyncIterator[asyncpg.Connection]:
    await add_device(db, "r1")
    async with connected_as(dsn, "agent_producer") as conn:
        yield conn


@pytest.fixture
async def outcomes(dsn: str, producer: asyncpg.Connection) -> AsyncIterator[list[dict[str, Any]]]:
    """What LISTEN agent_outcome delivered (to the producer's role, on a connection of its own)."""
    async with listening(dsn, producer, "agent_outcome") as payloads:
        yield payloads


def kinds(payloads: list[dict[str, Any]]) -> list[tuple[int, str]]:
    return [(p["version"], p["kind"]) for p in payloads]


async def status(conn: asyncpg.Connection, msg_id: int) -> dict[str, Any]:
    return dict(await conn.fetchrow("SELECT * FROM agent.command_status($1)", msg_id))


async def enqueue(conn: asyncpg.Connection, service: str, state: str = "on", **kw: Any) -> int:
    args = ", ".join(f"{k} => ${i}" for i, k in enumerate(kw, start=4))
    return await conn.fetchval(f"SELECT agent.enqueue($1, $2, $3{', ' + args if args else ''})",
                               "r1", service, state, *kw.values())


async def test_a_command_is_queued_then_settled_verified_and_announced_once(producer, outcomes, dsn):
    msg = await enqueue(producer, "wifi", request_id="pay-1")
    queued = await status(producer, msg)
    assert (queued["status"], queued["version"], queued["last_msg_id"], queued["queue"]) == \
        ("queued", msg, msg, "device_tasks")
    assert (queued["device"], queued["service"], queued["request_id"]) == ("r1", "wifi", "pay-1")
    async with running_agent(dsn, ScriptedDriver()):
        await until(lambda: outcomes, what="the outcome announced")
    [payload] = outcomes
    assert {k: payload[k] for k in ("version", "msg_id", "kind", "device", "service", "request_id", "error")} == \
        {"version": msg, "msg_id": msg, "kind": "verified", "device": "r1", "service": "wifi", "request_id": "pay-1",
         "error": None}
    settled = await status(producer, msg)
    assert (settled["status"], settled["kind"], settled["error"], settled["queue"]) == \
        ("settled", "verified", None, None)
    assert settled["at"] is not None and payload["at"].endswith("Z")


async def test_duplicate_expired_and_superseded_are_announced_and_final(producer, outcomes, dsn, db):
    first = await enqueue(producer, "wifi", request_id="pay-1")
    again = await enqueue(producer, "lan", request_id="pay-1")
    older = await enqueue(producer, "port-1", "off")
    newer = await enqueue(producer, "port-1", "on")
    late = await producer.fetchval("SELECT agent.enqueue('r1', 'port-2', 'on', not_after => now() + interval '1 s')")
    await until(lambda: db.fetchval("SELECT clock_timestamp() > (message->>'not_after')::timestamptz "
                                    "FROM pgmq.q_device_tasks WHERE msg_id = $1", late), what="not_after passed")
    async with running_agent(dsn, ScriptedDriver()):
        await until(lambda: len(outcomes) >= 5, what="five outcomes")
    assert sorted(kinds(outcomes)) == sorted([(first, "verified"), (again, "duplicate"), (older, "superseded"),
                                               (newer, "verified"), (late, "expired")])
    for msg, kind in kinds(outcomes):
        got = await status(producer, msg)
        assert (got["status"], got["kind"]) == ("settled", kind)


async def test_a_dead_letter_is_announced_and_its_replay_followed_by_the_same_id(producer, outcomes, dsn, db):
    device = ScriptedDriver()
    device.fail("r1", "wifi", PermanentError("the router said 403"))
    msg = await enqueue(producer, "wifi")
    async with running_agent(dsn, device):
        await until(lambda: outcomes, what="the dead letter announced")
        [payload] = outcomes
        assert (payload["kind"], payload["version"]) == ("dead_lettered", msg)
        assert "403" in payload["error"]
        dead = await status(producer, msg)
        assert (dead["status"], dead["kind"], dead["queue"]) == ("settled", "dead_lettered", "device_tasks_dlq")
        assert "403" in dead["error"] and dead["dlq_id"] is not None
        [(_, copy)] = await admin.dlq_replay(db, Queries("device_tasks"), [dead["dlq_id"]])
        await until(lambda: len(outcomes) == 2, what="the replay's outcome announced")
    assert outcomes[1]["version"] == msg and outcomes[1]["msg_id"] == copy
    replayed = await status(producer, msg)
    assert (replayed["status"], replayed["kind"], replayed["version"], replayed["last_msg_id"]) == \
        ("settled", "verified", msg, copy)
    assert (await status(producer, copy))["version"] == msg  # the copy's own id leads to the command too


async def test_a_replayed_dead_letter_is_queued_again_under_its_version(producer, db, dsn):
    device = ScriptedDriver()
    device.fail("r1", "wifi", PermanentError("the router said 403"))
    msg = await enqueue(producer, "wifi")
    async with running_agent(dsn, device):
        await until(lambda: db.fetchval("SELECT count(*) FROM pgmq.q_device_tasks_dlq"), what="dead-lettered")
    dead = await status(producer, msg)
    [(_, copy)] = await admin.dlq_replay(db, Queries("device_tasks"), [dead["dlq_id"]])
    queued = await status(producer, msg)
    assert (queued["status"], queued["version"], queued["last_msg_id"], queued["queue"], queued["dlq_id"]) == \
        ("queued", msg, copy, "device_tasks", None)


async def test_a_failed_attempt_is_retrying_with_its_error(producer, dsn):
    device = ScriptedDriver()
    device.fail("r1", "wifi", TransientError("router busy"), times=50)
    msg = await enqueue(producer, "wifi")
    async with running_agent(dsn, device, retry_base=30, retry_max=30, max_attempts=60):
        got = await until(lambda: _having(status(producer, msg), "retrying"), what="retrying")
    assert got["kind"] == "retried" and "router busy" in got["error"] and got["attempt"] == 1
    assert got["visible_at"] > got["at"]


async def test_a_command_for_a_paused_device_is_parked_with_the_reason(producer, dsn, db):
    await db.execute("UPDATE agent.devices SET paused_at = now(), paused_reason = 'firmware upgrade' WHERE id = 'r1'")
    msg = await enqueue(producer, "wifi")
    async with running_agent(dsn, ScriptedDriver()):
        got = await until(lambda: _having(status(producer, msg), "parked"), what="parked")
    assert got["kind"] == "parked" and "firmware upgrade" in got["error"]


async def test_a_command_moved_to_its_sites_queue_is_followed_there(producer, dsn, db):
    north = await asyncpg.connect(dsn)
    try:
        await init_database(north, "site_north", site="north")
    finally:
        await north.close()
    await add_device(db, "n1", site="north")
    msg = await producer.fetchval("SELECT agent.enqueue('n1', 'wifi', 'on', queue => 'device_tasks')")
    async with running_agent(dsn, ScriptedDriver()):
        got = await until(lambda: _having(status(producer, msg), "queued", queue="site_north"),
                          what="moved to north's queue")
    assert got["version"] == msg and got["last_msg_id"] != msg and got["device"] == "n1"
    assert (await status(producer, got["last_msg_id"]))["version"] == msg  # the copy's id leads to it too


async def test_an_unknown_id_is_unknown(producer):
    got = await status(producer, 987654)
    assert (got["status"], got["version"], got["kind"]) == ("unknown", 987654, None)


async def test_only_final_events_are_announced_and_each_payload_fits_a_notify(producer, outcomes, db):
    huge = "\"\x01é" * 20000  # every character escaped or multi-byte: 6 bytes each in JSON at worst
    await db.execute("INSERT INTO agent.events (kind, msg_id, version, device, service, request_id, error) VALUES "
                     "('failed', 7, 7, 'r1', 'wifi', NULL, 'x'), ('retried', 7, 7, 'r1', 'wifi', NULL, 'x'), "
                     "('drift', 8, NULL, 'r1', 'wifi', NULL, 'x'), "
                     "('dead_lettered', 7, 7, $1, $1, $1, $1)", huge)
    await db.execute("INSERT INTO agent.events (kind, msg_id, version) VALUES ('verified', 9, 9)")
    await until(lambda: (9, "verified") in kinds(outcomes), what="a later transaction's outcome")
    assert kinds(outcomes) == [(7, "dead_lettered"), (9, "verified")]  # in commit order, nothing else
    payload = outcomes[0]
    assert len(payload["error"]) == 500 and len(payload["request_id"]) == 200
    assert len(json.dumps(payload).encode()) < 8000


async def test_the_final_kinds_are_the_ones_the_contract_lists(producer):
    text = (Path(__file__).resolve().parents[2] / "docs" / "contract.md").read_text()
    table = text[text.index("| kind | final | meaning |"):]
    rows = re.findall(r"^\| `(\w+)` \| (yes)? *\|", table[: table.index("\n\n")], re.M)
    documented = {kind: final == "yes" for kind, final in rows}
    assert len(documented) > 10
    assert {k: await producer.fetchval("SELECT agent.final_kind($1)", k) for k in documented} == documented
    listed = text[text.index("### Final kinds"):]
    listed = listed[: listed.index(" Only")]  # the list in the prose says the same as the table
    assert set(re.findall(r"`(\w+)`", listed.split("\n", 1)[1])) == \
        {k for k, final in documented.items() if final}


async def _having(row: Any, wanted: str, **fields: Any) -> dict[str, Any] | None:
    got = await row
    return got if got["status"] == wanted and all(got[k] == v for k, v in fields.items()) else None


async def test_enqueue_says_fix_drop_or_retry_by_sqlstate(producer, db):
    with pytest.raises(asyncpg.InvalidParameterValueError):  # 22023: fix the call
        await producer.fetchval("SELECT agent.enqueue('r1', 'wifi', 'maybe')")
    with pytest.raises(asyncpg.NoDataFoundError, match="unknown device 'r404'") as unknown:  # P0002: drop it
        await producer.fetchval("SELECT agent.enqueue('r404', 'wifi', 'on')")
    assert unknown.value.sqlstate == "P0002" and "agentctl device add" in unknown.value.hint
    with pytest.raises(asyncpg.InvalidParameterValueError, match="queue 'nowhere' does not exist"):  # named: fix
        await producer.fetchval("SELECT agent.enqueue('r1', 'wifi', 'on', queue => 'nowhere')")
    await db.execute("SELECT agent.record_site('south', 'site_south')")  # recorded, never created
    await add_device(db, "s1", site="south")
    with pytest.raises(asyncpg.ObjectNotInPrerequisiteStateError) as missing:  # 55000: an operator's fix, retry
        await producer.fetchval("SELECT agent.enqueue('s1', 'wifi', 'on')")
    assert missing.value.sqlstate == "55000" and "agentctl db init --site south" in missing.value.hint
    assert await db.fetchval("SELECT count(*) FROM pgmq.q_device_tasks") == 0


async def test_every_statement_the_contract_gives_a_producer_runs_as_the_producer(producer, db):
    """contract.md's SQL, block by block, as a member of agent_producer (no PGMQ rights): a statement
    the producer is denied (the DLQ read through pgmq it once showed) fails here. The first block is
    the DBA's CREATE ROLE; the transaction example updates a table of the producer's own."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "contract.md").read_text()
    blocks = re.findall(r"```sql\n(.*?)```", text, re.S)
    assert blocks[0].startswith("CREATE ROLE") and len(blocks) > 6
    await add_device(db, "router-1")
    await db.execute("CREATE TABLE invoices (id integer PRIMARY KEY, paid_at timestamptz); INSERT INTO invoices "
                     "VALUES (42, NULL)")
    await db.execute("GRANT SELECT, UPDATE ON invoices TO agent_producer")
    for block in blocks[1:]:
        await producer.execute(block)  # fails on a permission denied, a wrong name or a wrong column
    assert await db.fetchval("SELECT paid_at IS NOT NULL FROM invoices WHERE id = 42")
