"""A worker role per site: a member of agent_worker_<site> reads and settles its site's queue and
writes the state and claims of its site's devices, and can neither read nor write another site's
queue, state or claims; commands move between sites only through agent.move_message, to the queue
of the device's site. agent_worker keeps serving every site (installs made before these roles)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from agent.contract import parse_command
from agent.db.queries import Queries, as_text
from agent.db.schema import init_database, worker_role
from agent.errors import ConfigError
from agent.model.outcome import EventRow, Outcome, StateUpdate
from agent.queue.admission import delivery
from agent.queue.reports import write_batch
from agent.queue.routing import Move, moved
from tests.support.agents import agentctl, running_agent
from tests.support.cluster import as_user, login_role, not_denied
from tests.support.db import add_device, archived, queue_len, send
from tests.support.devices import ScriptedDriver
from tests.support.wait import until

NORTH = "north_tasks"
HERE = Queries("device_tasks")  # the queue of site `default`, whose worker is the attacker here


@pytest.fixture
async def north(db: asyncpg.Connection) -> int:
    """Sites `default` (device_tasks, r1) and `north` (north_tasks, n1), with north's work under
    way: a command on its queue, n1's state and n1's claim. Returns that command's msg_id."""
    await init_database(db, NORTH, site="north")
    await add_device(db, "r1")
    await add_device(db, "n1", site="north")
    await db.execute("INSERT INTO agent.service_state (device, service, desired, observed) "
                     "VALUES ('n1', 'wifi', 'on', 'on')")
    await db.execute("INSERT INTO agent.device_claims (device, agent_id, expires_at) "
                     "VALUES ('n1', 'gw-north', now() + interval '1 hour')")
    return await send(db, {"device": "n1", "service": "wifi", "state": "on"}, queue=NORTH)


async def login(dsn: str, group: str) -> AsyncIterator[asyncpg.Connection]:
    async with login_role(dsn, group) as name:
        conn = await asyncpg.connect(as_user(dsn, name))
        try:
            yield conn
        finally:
            await conn.close()


@pytest.fixture
async def default_worker(dsn: str, north: int) -> AsyncIterator[asyncpg.Connection]:
    """An agent host of site `default`, logged in as a member of that site's role only."""
    async for conn in login(dsn, "agent_worker_default"):
        yield conn


def refused(north_msg: int) -> list[str]:
    return [
        "SELECT * FROM pgmq.read('north_tasks', 30, 1)",
        "SELECT count(*) FROM pgmq.q_north_tasks",
        "SELECT count(*) FROM pgmq.a_north_tasks",
        "SELECT count(*) FROM pgmq.q_north_tasks_dlq",
        "SELECT pgmq.send('north_tasks', '{\"device\": \"n1\", \"service\": \"wifi\", \"state\": \"off\"}'::jsonb)",
        "DELETE FROM pgmq.q_north_tasks",
        "UPDATE pgmq.q_north_tasks SET vt = now()",
        "INSERT INTO agent.service_state (device, service, desired) VALUES ('n1', 'lan', 'on')",
        "INSERT INTO agent.service_state (device, service, desired) VALUES ('n1', 'wifi', 'off') "
        "ON CONFLICT (device, service) DO UPDATE SET desired = 'off'",
        "INSERT INTO agent.device_claims (device, agent_id, expires_at) VALUES ('n1', 'evil', now() + interval '1 h') "
        "ON CONFLICT (device) DO UPDATE SET agent_id = 'evil'",
        "INSERT INTO agent.device_claims (device, agent_id, expires_at) VALUES ('n2', 'evil', now())",
        f"SELECT agent.move_message('north_tasks', {north_msg}, 0, 'device_tasks')",
        f"SELECT agent.move_message('north_tasks', {north_msg}, 0, 'north_tasks')",
    ]


async def test_db_init_makes_a_nologin_role_for_the_site_that_shares_only_the_common_bits(db, north):
    rows = await db.fetch("SELECT r.rolname, r.rolcanlogin, array(SELECT g.rolname FROM pg_auth_members m "
                          "JOIN pg_roles g ON g.oid = m.roleid WHERE m.member = r.oid) AS member_of "
                          "FROM pg_roles r WHERE r.rolname IN ('agent_worker_default', 'agent_worker_north') "
                          "ORDER BY r.rolname")
    assert [(r["rolname"], r["rolcanlogin"], r["member_of"]) for r in rows] == [
        ("agent_worker_default", False, ["agent_worker_common"]),
        ("agent_worker_north", False, ["agent_worker_common"])]


def test_a_site_role_name_is_a_plain_identifier_of_its_own():
    assert worker_role("north") == "agent_worker_north"
    assert worker_role("common") != "agent_worker_common"  # every site's role, not a site's
    odd = [worker_role(s) for s in ("North", "north east", "Zürich", "x" * 64, "'; DROP ROLE x; --")]
    assert len(set(odd)) == len(odd) and "agent_worker_north" not in odd
    assert all(len(r) <= 63 and r.replace("_", "a").isalnum() and r.isascii() and r.islower() for r in odd)


async def test_a_sites_worker_can_neither_read_nor_write_another_sites_queue_state_or_claims(
        db, north, default_worker):
    w = default_worker
    assert await not_denied(w, refused(north)) == []
    # rows of north's devices are not even seen: reading finds nothing, writing changes nothing
    assert await w.fetchval("SELECT count(*) FROM agent.service_state WHERE device = 'n1'") == 0
    assert await w.fetchval("SELECT count(*) FROM agent.device_claims WHERE device = 'n1'") == 0
    assert await w.execute("UPDATE agent.service_state SET desired = 'off' WHERE device = 'n1'") == "UPDATE 0"
    assert await w.execute("UPDATE agent.device_claims SET agent_id = 'evil' WHERE device = 'n1'") == "UPDATE 0"
    assert await w.execute("DELETE FROM agent.device_claims WHERE device = 'n1'") == "DELETE 0"
    # as north left them
    assert await queue_len(db, NORTH) == 1 and await db.fetchval('SELECT count(*) FROM pgmq."q_north_tasks_dlq"') == 0
    assert await db.fetchval("SELECT desired FROM agent.service_state WHERE device = 'n1'") == "on"
    assert await db.fetchval("SELECT agent_id FROM agent.device_claims WHERE device = 'n1'") == "gw-north"


async def test_a_sites_worker_does_its_own_work(db, north, default_worker):
    """Read its queue, accept and report a command (state and events), claim its device, and move a
    command that reached it for north's device onto north's queue."""
    w = default_worker
    mine = await send(db, {"device": "r1", "service": "wifi", "state": "on"})
    stray = await send(db, {"device": "n1", "service": "lan", "state": "on"})
    d_mine, d_stray = [delivery(r, time.time()) for r in await w.fetch(HERE.read, HERE.queue, 30, 10, 65536)]
    claimed = await w.fetchrow(HERE.claim_devices, "gw-default", ["r1"], as_text([60.0]), [], "host", 1, [],
                               "gw-default-instance-1")
    assert claimed["claimed"] == ["r1"]
    now = time.time()
    done = Outcome(d_mine, "archive", [EventRow("verified", "r1", "wifi", mine, d_mine.version)],
                   StateUpdate("r1", "wifi", "on", d_mine.version, "on", now, now, now, msg_id=mine))
    move = moved(d_stray, parse_command(d_stray.raw, 65536), Move(NORTH, {}), HERE.queue, "north")
    assert await write_batch(w, HERE, "gw-default", [done, move]) == set()
    assert await archived(db, mine) and await archived(db, stray)
    assert (await db.fetchrow("SELECT observed FROM agent.service_state WHERE device = 'r1'"))["observed"] == "on"
    head = await db.fetchval("SELECT headers->>'rerouted_from' FROM pgmq.q_north_tasks "
                             "WHERE message->>'service' = 'lan'")
    assert head is not None and await queue_len(db, NORTH) == 2
    assert await w.execute(HERE.release_all_claims, "gw-default", "gw-default-instance-1") == "DELETE 1"


async def test_a_move_to_a_queue_not_the_devices_sites_moves_nothing(db, north, default_worker):
    """agent.move_message checks the target: not the queue of the device's site (or the queue the
    message is on) leaves the message where it is, to be routed anew once its lease ends."""
    await init_database(db, "south_tasks", site="south")
    stray = await send(db, {"device": "n1", "service": "lan", "state": "on"})
    [row] = await default_worker.fetch(HERE.read, HERE.queue, 30, 1, 65536)
    for target in ("south_tasks", "device_tasks", "north_tasks_dlq"):
        assert await default_worker.fetchval("SELECT agent.move_message('device_tasks', $1, $2, $3)",
                                             stray, row["read_ct"], target) is None
    assert await default_worker.fetchval("SELECT agent.move_message('device_tasks', $1, $2, 'north_tasks')",
                                         stray, row["read_ct"] + 1) is None  # another reader's delivery
    assert await queue_len(db) == 1 and await queue_len(db, "south_tasks") == 0 and await queue_len(db, NORTH) == 1


async def test_the_all_sites_worker_role_still_serves_every_site(db, dsn, north):
    """Installs made before the per-site roles run their agents as agent_worker: nothing changes."""
    async for w in login(dsn, "agent_worker"):
        assert await w.fetchval("SELECT count(*) FROM agent.service_state WHERE device = 'n1'") == 1
        assert await w.execute("UPDATE agent.device_claims SET expires_at = now() WHERE device = 'n1'") == "UPDATE 1"
        assert len(await w.fetch("SELECT * FROM pgmq.read('north_tasks', 30, 1)")) == 1


async def test_a_sites_agent_leads_reconciles_and_prunes_as_its_sites_role(db, dsn, north):
    """The leader's work as a member of agent_worker_default: a scheduled-style run over its site's
    devices repairs drift, and a prune pass reads its tables' figures."""
    await db.execute("INSERT INTO agent.service_state (device, service, desired, observed) "
                     "VALUES ('r1', 'wifi', 'on', 'off')")
    device = ScriptedDriver()
    device.states[("r1", "wifi")] = "off"
    async with login_role(dsn, "agent_worker_default") as name:
        async with running_agent(as_user(dsn, name), device, prune_interval=3600) as agent:
            await until(lambda: agent.leadership.leading, timeout=15, what="the site's leader")
            run = await db.fetchval("SELECT agent.request_sync('default')")
            await until(lambda: db.fetchval("SELECT finished_at IS NOT NULL FROM agent.sync_runs WHERE id = $1", run),
                        timeout=30, what="the run finished")
            await until(lambda: agent.reconciler.tables, timeout=15, what="a prune pass and table figures")
    assert device.states[("r1", "wifi")] == "on"
    assert await db.fetchval("SELECT repaired FROM agent.sync_runs WHERE id = $1", run) == 1
    assert await db.fetchval("SELECT observed FROM agent.service_state WHERE device = 'n1'") == "on"  # north's, as is


async def test_an_agent_logged_in_with_another_sites_role_refuses_to_start_naming_the_grant(dsn, north):
    async with login_role(dsn, "agent_worker_default") as name:
        with pytest.raises(ConfigError, match=rf"may not read and settle queue 'north_tasks'.*"
                                              rf'GRANT "agent_worker_north" TO "{name}";'):
            async with running_agent(as_user(dsn, name), ScriptedDriver(), site="north", queue=NORTH):
                pass


async def test_fleet_status_from_a_sites_login_shows_other_sites_without_their_queues(dsn, north):
    """`agentctl status --fleet --all-sites` on an edge host, with its agent's login: its own queue's
    figures, and the other site listed with its queue not readable (not reported missing)."""
    async with login_role(dsn, "agent_worker_default") as name:
        proc = agentctl(as_user(dsn, name), "status", "--fleet", "--all-sites", "--json", check=False)
        text = agentctl(as_user(dsn, name), "status", "--fleet", "--all-sites", check=False)
    assert "Traceback" not in proc.stderr + text.stderr, proc.stderr + text.stderr
    sites = {s["site"]: s for s in json.loads(proc.stdout)["sites"]}
    assert (sites["default"]["queue_depth"], sites["default"]["queue_hidden"]) == (0, False)
    assert (sites["north"]["queue_depth"], sites["north"]["queue_missing"], sites["north"]["queue_hidden"]) == (
        None, False, True)
    assert "queue north_tasks (not readable by this login" in text.stdout


async def test_db_init_by_an_owner_without_createrole_still_grants_the_roles_that_exist(empty_dsn, caplog):
    """The roles were made by a superuser before this release; the owner may not create the site's
    new role: db init says which CREATE ROLE to ask for, and agent_worker gets what this release
    needs all the same (an upgrade never leaves the agents without their grants)."""
    site = f"nocreate_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(empty_dsn)
    try:
        for role in ("agent_producer", "agent_worker", "agent_worker_common"):  # made by a superuser
            await admin.execute(f"DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{role}') "
                                f"THEN CREATE ROLE {role} NOLOGIN; END IF; END $$")
        name = await admin.fetchval("SELECT current_database()")
        async with login_role(empty_dsn) as owner:
            await admin.execute(f'ALTER DATABASE "{name}" OWNER TO "{owner}"')
            conn = await asyncpg.connect(as_user(empty_dsn, owner))
            try:
                result = await init_database(conn, "nc_tasks", site=site)
            finally:
                await conn.close()
                await admin.execute(f'ALTER DATABASE "{name}" OWNER TO CURRENT_USER')
            granted = await admin.fetchrow(
                "SELECT has_table_privilege('agent_worker', 'pgmq.q_nc_tasks', 'SELECT, UPDATE, DELETE') AS queue, "
                "has_function_privilege('agent_worker', 'agent.move_message(text, bigint, integer, text, boolean)', "
                "'EXECUTE') AS move, has_table_privilege('agent_worker_common', 'agent.events', 'INSERT') AS common")
            assert dict(granted) == {"queue": True, "move": True, "common": True}
            assert result["roles"] == f"missing: {worker_role(site)}"
            assert f"CREATE ROLE \"{worker_role(site)}\" NOLOGIN;" in caplog.text
    finally:
        await admin.close()
