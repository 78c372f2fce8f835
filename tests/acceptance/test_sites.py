"""Two sites on one database, each with its own agentd and queue: producers name no queue and each
command reaches its site's agent; a command put on the wrong site's queue is moved, not dead-lettered."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import asyncpg
import pytest

from tests.support.agents import agentctl, spawn_agentd
from tests.support.cluster import as_user, login_role
from tests.support.db import dlq, queue_len, send
from tests.support.wait import until

pytestmark = pytest.mark.acceptance

NORTH = "north_tasks"


def read(path: Path) -> dict[str, str]:
    try:
        return json.loads(path.read_text() or "{}")
    except (FileNotFoundError, ValueError):
        return {}


async def verified_by(db: asyncpg.Connection, request_id: str) -> str | None:
    return await db.fetchval("SELECT agent_id FROM agent.events WHERE request_id = $1 AND kind = 'verified'",
                             request_id)


async def settled_by(db: asyncpg.Connection, request_id: str) -> str | None:
    """The agent that ended the command: verified it, or found a newer one in force."""
    return await db.fetchval("SELECT agent_id FROM agent.events WHERE request_id = $1 "
                             "AND kind IN ('verified', 'superseded')", request_id)


@pytest.fixture
async def two_sites(db: asyncpg.Connection, dsn: str, tmp_path: Path) -> dict[str, Path]:
    """Site `default` (queue device_tasks) with r1, site `north` (north_tasks) with n1, an agent each."""
    agentctl(dsn, "db", "init", "--site", "north", "--queue", NORTH)
    files = {d: tmp_path / f"{d}.json" for d in ("r1", "n1")}
    agentctl(dsn, "device", "add", "r1", "--driver", "sim", "--option", f"state_file={files['r1']}")
    agentctl(dsn, "device", "add", "n1", "--driver", "sim", "--site", "north", "--option", f"state_file={files['n1']}")
    common = {"retry_base": 0.05, "retry_max": 0.3, "poll_interval": 1}
    spawn_agentd(dsn, agent_id="gw-default", **common)
    spawn_agentd(dsn, agent_id="gw-north", site="north", queue=NORTH, **common)
    await until(lambda: db.fetchval("SELECT count(*) = 2 FROM agent.agents WHERE state = 'ready'"), timeout=20,
                what="both sites' agents ready")
    return files


async def test_commands_enqueued_without_a_queue_reach_their_sites_agent(db, dsn, two_sites):
    for i, (device, state) in enumerate([("r1", "on"), ("n1", "on"), ("n1", "off"), ("r1", "off"), ("n1", "on")]):
        await db.fetchval("SELECT agent.enqueue($1, 'wifi', $2, request_id => $3)", device, state, f"req-{i}")
    await until(lambda: verified_by(db, "req-4"), timeout=20, what="the last command verified")
    # every command settles (req-3's report may land after req-4's): nothing is left in either queue
    async def both_empty() -> bool:
        return await queue_len(db) == 0 and await queue_len(db, NORTH) == 0

    await until(both_empty, timeout=10, what="both queues empty")
    # r1's on and off may come in one take (a late wake-up reads both): the newest, off, is then in
    # effect already, and the on is superseded, never written; a service never written reads as off
    assert read(two_sites["r1"]).get("wifi", "off") == "off" and read(two_sites["n1"]).get("wifi") == "on"
    assert await settled_by(db, "req-0") == await settled_by(db, "req-3") == "gw-default"
    assert await verified_by(db, "req-4") == "gw-north"
    assert not await db.fetchval("SELECT count(*) FROM agent.events WHERE kind IN ('rerouted', 'dead_lettered')")


async def test_a_command_on_the_wrong_sites_queue_is_moved_and_verified_by_the_right_agent(db, dsn, two_sites):
    await send(db, {"device": "n1", "service": "voip", "state": "on", "request_id": "lost-1"})  # onto device_tasks
    await until(lambda: verified_by(db, "lost-1"), timeout=20, what="the misrouted command verified")
    assert read(two_sites["n1"]).get("voip") == "on"
    rows = await db.fetch("SELECT kind, agent_id, meta::text AS meta FROM agent.events WHERE request_id = 'lost-1' "
                          "AND kind IN ('rerouted', 'verified', 'dead_lettered') ORDER BY id")
    assert [(r["kind"], r["agent_id"]) for r in rows] == [("rerouted", "gw-default"), ("verified", "gw-north")]
    assert json.loads(rows[0]["meta"])["to_queue"] == NORTH
    assert await dlq(db) == [] and await dlq(db, NORTH) == []
    fleet = json.loads(agentctl(dsn, "status", "--fleet", "--all-sites", "--json").stdout)
    leaders = {s["site"]: s["leader"] for s in fleet["sites"]}
    assert leaders == {"default": "gw-default", "north": "gw-north"}


def once(dsn: str, **settings: str) -> str:
    """`agentd --once`: drain the queue and exit 0."""
    proc = spawn_agentd(dsn, "--once", **settings)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    return out


async def move_r1_to_north(dsn: str, state_file: Path) -> dict[str, str]:
    """The operator moves r1 to site north, which has a queue of its own (operations.md, Sites)."""
    agentctl(dsn, "db", "init", "--site", "north", "--queue", NORTH)
    agentctl(dsn, "device", "add", "r1", "--driver", "sim", "--site", "north", "--option", f"state_file={state_file}")
    return {"site": "north", "queue": NORTH}


async def give_the_site_a_new_queue(dsn: str, db: asyncpg.Connection) -> dict[str, str]:
    """operations.md "To give a site another queue": drained, its row deleted, db init with the new queue."""
    await db.execute("DELETE FROM agent.sites WHERE name = 'default'")
    agentctl(dsn, "db", "init", "--site", "default", "--queue", "tasks_2")
    return {"site": "default", "queue": "tasks_2"}


@pytest.mark.parametrize("change", ["device moved to another site", "site given another queue"])
async def test_a_newer_command_through_a_younger_queue_is_applied_not_superseded(db, dsn, tmp_path, change):
    state_file = tmp_path / "r1.json"
    agentctl(dsn, "device", "add", "r1", "--driver", "sim", "--option", f"state_file={state_file}")
    for i in range(30):  # the site's queue has been busy: its ids run ahead of a queue made later
        await db.fetchval("SELECT agent.enqueue('r1', $1, 'on')", f"svc{i}")
    await db.fetchval("SELECT agent.enqueue('r1', 'pppoe:bob', 'on', request_id => 'on-1')")
    once(dsn)
    assert read(state_file).get("pppoe:bob") == "on"
    where = await (move_r1_to_north(dsn, state_file) if change.startswith("device")
                   else give_the_site_a_new_queue(dsn, db))
    off = await db.fetchval("SELECT agent.enqueue('r1', 'pppoe:bob', 'off', request_id => 'off-1')")
    assert await queue_len(db, where["queue"]) == 1  # routed by agent.enqueue to the new queue
    once(dsn, **where)
    kinds = [r["kind"] for r in await db.fetch("SELECT kind FROM agent.events WHERE request_id = 'off-1' ORDER BY id")]
    assert "superseded" not in kinds and kinds[-1] == "verified", kinds
    assert read(state_file).get("pppoe:bob") == "off"
    row = await db.fetchrow("SELECT desired, desired_version FROM agent.service_state "
                            "WHERE device = 'r1' AND service = 'pppoe:bob'")
    assert (row["desired"], row["desired_version"]) == ("off", off)


async def test_each_sites_agent_logged_in_as_its_sites_role_does_its_work_and_moves_strays(db, dsn, tmp_path):
    """agentd of each site runs as a member of its site's role only (agent_worker_<site>): commands
    reach their device, and one put on the wrong site's queue is moved to the right one (through
    agent.move_message: neither role may send to the other's queue) and done there."""
    out = agentctl(dsn, "db", "init", "--site", "north", "--queue", NORTH).stdout
    assert "role agent_worker_north" in out
    files = {d: tmp_path / f"{d}.json" for d in ("r1", "n1")}
    agentctl(dsn, "device", "add", "r1", "--driver", "sim", "--option", f"state_file={files['r1']}")
    agentctl(dsn, "device", "add", "n1", "--driver", "sim", "--site", "north", "--option", f"state_file={files['n1']}")
    common = {"retry_base": 0.05, "retry_max": 0.3, "poll_interval": 1}
    async with login_role(dsn, "agent_worker_default") as gw_default, login_role(dsn, "agent_worker_north") as gw_north:
        procs = [spawn_agentd(as_user(dsn, gw_default), agent_id="gw-default", **common),
                 spawn_agentd(as_user(dsn, gw_north), agent_id="gw-north", site="north", queue=NORTH, **common)]
        try:
            await until(lambda: db.fetchval("SELECT count(*) = 2 FROM agent.agents WHERE state = 'ready'"),
                        timeout=20, what="both sites' agents ready")
            await db.fetchval("SELECT agent.enqueue('r1', 'wifi', 'on', request_id => 'r-1')")
            await db.fetchval("SELECT agent.enqueue('n1', 'wifi', 'on', request_id => 'n-1')")
            await send(db, {"device": "n1", "service": "lan", "state": "on", "request_id": "stray"})  # default's
            await until(lambda: read(files["r1"]) == {"wifi": "on"}
                        and read(files["n1"]) == {"wifi": "on", "lan": "on"},
                        timeout=20, what="every command on its device")
            await until(lambda: verified_by(db, "stray"), timeout=10, what="the stray command verified")
        finally:
            for proc in procs:
                proc.send_signal(signal.SIGTERM)
            logs = [proc.communicate(timeout=30)[0] for proc in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    assert not any("permission denied" in log or "row-level security" in log for log in logs), logs
    assert [await verified_by(db, r) for r in ("r-1", "n-1", "stray")] == ["gw-default", "gw-north", "gw-north"]
    rerouted = await db.fetchval("SELECT agent_id FROM agent.events WHERE request_id = 'stray' AND kind = 'rerouted'")
    assert rerouted == "gw-default" and await dlq(db) == [] and await dlq(db, NORTH) == []
