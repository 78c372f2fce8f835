"""Routing by site: producers never name a queue. agent.enqueue and agent.request_sync route by the
device's site; `agentctl db init --site` records a site's queue; a command that reaches another
site's queue is moved there once (one `rerouted` event), and dead-lettered if misrouted again."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import asyncpg
import pytest

from agent.contract import parse_command
from agent.db.queries import Queries
from agent.db.schema import init_database
from agent.errors import ConfigError
from agent.queue.admission import delivery
from agent.queue.reports import write_batch
from agent.queue.routing import Move, moved
from tests.support.agents import agent_env, agentctl, running_agent
from tests.support.cluster import as_user, login_role
from tests.support.db import add_device, archived, dlq, queue_len, send
from tests.support.devices import ScriptedDriver
from tests.support.wait import until

NORTH = "north_tasks"


@pytest.fixture
async def north(db: asyncpg.Connection) -> None:
    """Two sites on one database: `default` (device_tasks, from the fixture) and `north`."""
    await init_database(db, NORTH, site="north")
    await add_device(db, "r1")
    await add_device(db, "n1", site="north")


async def enqueue(db: asyncpg.Connection, device: str, **kw: str) -> int:
    named = "".join(f", {k} => ${i}" for i, k in enumerate(kw, start=3))
    return await db.fetchval(f"SELECT agent.enqueue($1, $2, 'on'{named})", device, "wifi", *kw.values())


async def on_queue(db: asyncpg.Connection, queue: str, msg_id: int) -> bool:
    return await db.fetchval(f'SELECT EXISTS (SELECT 1 FROM pgmq."q_{queue}" WHERE msg_id = $1)', msg_id)


async def headers(db: asyncpg.Connection, queue: str) -> list[dict]:  # type: ignore[type-arg]
    rows = await db.fetch(f'SELECT headers::text AS h FROM pgmq."q_{queue}" ORDER BY msg_id')
    return [json.loads(r["h"]) if r["h"] else {} for r in rows]


# -- producers ------------------------------------------------------------------------------------

async def test_enqueue_without_a_queue_goes_to_the_queue_of_the_devices_site(db, north):
    to_north = await enqueue(db, "n1")
    to_default = await enqueue(db, "r1")
    assert await on_queue(db, NORTH, to_north) and await queue_len(db, NORTH) == 1
    assert await on_queue(db, "device_tasks", to_default) and await queue_len(db) == 1


async def test_an_explicit_queue_still_wins(db, north):
    msg = await enqueue(db, "n1", queue="device_tasks")
    assert await on_queue(db, "device_tasks", msg) and await queue_len(db, NORTH) == 0


async def test_a_site_with_no_queue_recorded_falls_back_to_the_default_queue(db, north):
    await add_device(db, "w1", site="west")
    msg = await enqueue(db, "w1")
    assert await on_queue(db, "device_tasks", msg)


async def test_a_producer_needs_only_execute_to_be_routed(db, dsn, north):
    async with login_role(dsn, "agent_producer") as name:
        producer = await asyncpg.connect(as_user(dsn, name))
        try:
            msg = await producer.fetchval("SELECT agent.enqueue('n1', 'wifi', 'on')")
            run = await producer.fetchval("SELECT agent.request_sync(device => 'n1')")
        finally:
            await producer.close()
    assert await on_queue(db, NORTH, msg)
    assert await db.fetchval("SELECT site FROM agent.sync_runs WHERE id = $1", run) == "north"


async def test_request_sync_by_device_is_for_the_devices_site(db, north):
    await db.execute("INSERT INTO agent.service_state (device, service, desired) VALUES ('n1', 'wifi', 'on')")
    run = await db.fetchval("SELECT agent.request_sync(NULL, 'n1')")
    row = await db.fetchrow("SELECT site, device, devices FROM agent.sync_runs WHERE id = $1", run)
    assert (row["site"], row["device"], row["devices"]) == ("north", "n1", 1)
    with pytest.raises(asyncpg.InvalidParameterValueError, match="unknown device 'ghost'"):
        await db.fetchval("SELECT agent.request_sync(device => 'ghost')")
    with pytest.raises(asyncpg.InvalidParameterValueError, match="no device 'n1' in site 'default'"):
        await db.fetchval("SELECT agent.request_sync('default', 'n1')")  # a named site is still checked
    with pytest.raises(asyncpg.InvalidParameterValueError, match="site must not be NULL"):
        await db.fetchval("SELECT agent.request_sync()")


# -- db init and the inventory --------------------------------------------------------------------

async def test_db_init_site_creates_its_queues_and_records_them(db, dsn):
    agentctl(dsn, "db", "init", "--site", "north", "--queue", NORTH)
    again = agentctl(dsn, "db", "init", "--site", "north", "--queue", NORTH)
    assert "site north: commands for its devices go to queue north_tasks" in again.stdout
    assert await db.fetchval("SELECT count(*) FROM pgmq.meta WHERE queue_name IN ($1, $2)", NORTH, f"{NORTH}_dlq") == 2
    sites = await db.fetch("SELECT name, queue FROM agent.sites ORDER BY name")
    assert [tuple(r) for r in sites] == [("default", "device_tasks"), ("north", NORTH)]


async def test_db_init_refuses_a_second_pairing_and_names_what_is_recorded(db, dsn):
    agentctl(dsn, "db", "init", "--site", "north", "--queue", NORTH)
    other = agentctl(dsn, "db", "init", "--site", "north", "--queue", "north_other", check=False)
    assert other.returncode == 2 and "site 'north' is recorded with queue 'north_tasks'" in other.stderr
    taken = agentctl(dsn, "db", "init", "--site", "south", check=False)  # AGENT_QUEUE is default's
    assert taken.returncode == 2 and "queue 'device_tasks' is already the queue of site 'default'" in taken.stderr
    assert "agentctl db init --site 'south' --queue <name>" in taken.stderr
    assert not await db.fetchval("SELECT count(*) FROM pgmq.meta WHERE queue_name = 'north_other'")


def test_db_init_print_sql_records_the_site():
    env = {k: v for k, v in agent_env("x").items() if k != "AGENT_DATABASE_URL"} | {"AGENT_CONFIG": ""}
    proc = subprocess.run([sys.executable, "-m", "agent.cli.agentctl", "db", "init", "--print-sql", "--site", "north",
                           "--queue", NORTH], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "SELECT agent.record_site('north', 'north_tasks');" in proc.stdout
    assert "SELECT pgmq.create('north_tasks');" in proc.stdout


async def test_device_add_for_a_site_with_no_queue_is_refused_with_the_command_to_run(db, dsn, tmp_path):
    refused = agentctl(dsn, "device", "add", "w1", "--driver", "sim", "--site", "west", check=False)
    assert refused.returncode == 2 and "agentctl db init --site west --queue <name>" in refused.stderr
    path = tmp_path / "devices.json"
    path.write_text(json.dumps([{"id": "r9", "driver": "sim"}, {"id": "w2", "driver": "sim", "site": "west"}]))
    assert agentctl(dsn, "device", "import", str(path), check=False).returncode == 2
    assert await db.fetchval("SELECT count(*) FROM agent.devices") == 0  # nothing half-imported
    agentctl(dsn, "db", "init", "--site", "west", "--queue", "west_tasks")
    agentctl(dsn, "device", "add", "w1", "--driver", "sim", "--site", "west")
    agentctl(dsn, "device", "import", str(path))
    assert await db.fetchval("SELECT count(*) FROM agent.devices") == 3


@pytest.mark.parametrize(("site", "queue", "says"), [
    ("north", "device_tasks", r"site 'north' \(AGENT_SITE\) records queue 'north_tasks'"),
    ("default", NORTH, "AGENT_QUEUE is 'north_tasks', but site 'default' .* records queue 'device_tasks'"),
    ("south", NORTH, "AGENT_QUEUE 'north_tasks' is the queue of site 'north', not of 'south'"),
])
async def test_an_agent_on_a_queue_not_its_sites_refuses_to_start(dsn, north, site, queue, says):
    with pytest.raises(ConfigError, match=says):
        async with running_agent(dsn, ScriptedDriver(), site=site, queue=queue):
            pass


# -- the move -------------------------------------------------------------------------------------

async def test_a_command_for_another_sites_device_is_moved_once_with_one_event(db, dsn, north):
    device = ScriptedDriver()
    async with running_agent(dsn, device):
        msg = await send(db, {"device": "n1", "service": "wifi", "state": "on", "request_id": "pay-7"})
        await until(lambda: queue_len(db, NORTH), what="the command on north's queue")
    assert await queue_len(db) == 0 and await archived(db, msg) and await dlq(db) == []
    [head] = await headers(db, NORTH)
    assert head["rerouted_from"] == {"queue": "device_tasks", "site": "default", "msg_id": msg}
    assert head["origin_msg_id"] == msg  # its version goes with it
    ev = await db.fetchrow("SELECT kind, device, request_id, meta::text AS meta FROM agent.events WHERE msg_id = $1",
                           msg)
    assert (ev["kind"], ev["device"], ev["request_id"]) == ("rerouted", "n1", "pay-7")
    assert json.loads(ev["meta"]) == {"from_queue": "device_tasks", "to_queue": NORTH, "to_site": "north"}
    assert device.calls == []  # this site's agent never touched it


async def test_a_command_moved_late_keeps_its_version_and_does_not_overtake_a_newer_one(db, dsn, north):
    await send(db, {"device": "n1", "service": "wifi", "state": "on", "request_id": "late-on"})  # the wrong queue
    await db.fetchval("SELECT agent.enqueue('n1', 'wifi', 'off', request_id => 'new-off')")  # north's, and newer
    device = ScriptedDriver()
    device.states[("n1", "wifi")] = "on"
    async with running_agent(dsn, device, site="north", queue=NORTH):
        await until(lambda: kind_of(db, "new-off", "verified"), what="the newer command verified")
    async with running_agent(dsn, ScriptedDriver()):
        await until(lambda: queue_len(db, NORTH), what="the older command moved to north")
    async with running_agent(dsn, device, site="north", queue=NORTH):
        await until(lambda: kind_of(db, "late-on", "superseded"), what="the older command superseded")
    assert device.states[("n1", "wifi")] == "off"
    row = await db.fetchrow("SELECT desired, desired_version FROM agent.service_state WHERE device = 'n1'")
    assert row["desired"] == "off"


async def kind_of(db: asyncpg.Connection, request_id: str, kind: str) -> bool:
    return await db.fetchval("SELECT EXISTS (SELECT 1 FROM agent.events WHERE request_id = $1 AND kind = $2)",
                             request_id, kind)


async def test_a_moved_command_misrouted_again_is_dead_lettered_not_moved_back(db, dsn, north):
    async with running_agent(dsn, ScriptedDriver()):
        await send(db, {"device": "n1", "service": "wifi", "state": "on"})
        await until(lambda: queue_len(db, NORTH), what="the command moved to north")
    await db.execute("UPDATE agent.devices SET site = 'default' WHERE id = 'n1'")  # reassigned meanwhile
    async with running_agent(dsn, ScriptedDriver(), site="north", queue=NORTH):
        [entry] = await until(lambda: dlq(db, NORTH), what="the second misroute dead-lettered")
    assert "already moved once (from queue 'device_tasks')" in entry["headers"]["reason"]
    assert await queue_len(db) == 0 and await queue_len(db, NORTH) == 0
    kinds = [r["kind"] for r in await db.fetch("SELECT kind FROM agent.events ORDER BY id")]
    assert kinds == ["rerouted", "dead_lettered"]


async def test_a_site_whose_queue_is_missing_gets_nothing_moved_and_nothing_lost(db, dsn, north):
    await db.execute("SELECT pgmq.drop_queue($1)", NORTH)
    async with running_agent(dsn, ScriptedDriver()):
        await send(db, {"device": "n1", "service": "wifi", "state": "on"})
        [entry] = await until(lambda: dlq(db), what="the command dead-lettered")
    assert "queue 'north_tasks' does not exist" in entry["headers"]["reason"]


async def test_an_unknown_device_is_still_dead_lettered_as_unknown(db, dsn, north):
    async with running_agent(dsn, ScriptedDriver()):
        await send(db, {"device": "ghost", "service": "wifi", "state": "on"})
        [entry] = await until(lambda: dlq(db), what="the command dead-lettered")
    assert "unknown device 'ghost'" in entry["headers"]["reason"]


async def test_a_reconcile_message_for_another_sites_device_is_reported_not_moved(db, dsn, north):
    run = await db.fetchval("INSERT INTO agent.sync_runs (site, kind) VALUES ('default', 'manual') RETURNING id")
    await db.execute("INSERT INTO agent.sync_devices (run, device) VALUES ($1, 'n1')", run)
    async with running_agent(dsn, ScriptedDriver()):
        msg = await send(db, {"reconcile": {"run": run, "device": "n1"}})
        await until(lambda: archived(db, msg), what="the reconcile message settled")
    item = await db.fetchrow("SELECT result, error FROM agent.sync_items WHERE run = $1", run)
    assert item["result"] == "unreadable" and "belongs to site 'north'" in item["error"]
    assert await queue_len(db, NORTH) == 0 and await dlq(db) == []


async def test_the_worker_role_may_move_to_another_sites_queue(db, dsn, north):
    q = Queries("device_tasks")
    msg = await send(db, {"device": "n1", "service": "wifi", "state": "on"})
    async with login_role(dsn, "agent_worker") as name:
        worker = await asyncpg.connect(as_user(dsn, name))
        try:
            [row] = await worker.fetch(q.read, q.queue, 30, 1, 65536)
            d = delivery(row, time.time())
            out = moved(d, parse_command(d.raw, 65536), Move(NORTH, {"rerouted_from": {"queue": q.queue}}),
                        q.queue, "north")
            assert await write_batch(worker, q, "worker-test", [out]) == set()
        finally:
            await worker.close()
    assert await archived(db, msg) and await queue_len(db, NORTH) == 1


# -- the fleet ------------------------------------------------------------------------------------

async def test_status_fleet_shows_every_sites_queue_dlq_leader_and_unreachable_devices(db, dsn, north):
    await enqueue(db, "n1")
    await enqueue(db, "n1")
    await send(db, {"device": "n1"}, queue=f"{NORTH}_dlq")
    await db.execute("INSERT INTO agent.reachability (device, reachable, reason) VALUES ('n1', false, 'peer down')")
    async with running_agent(dsn, ScriptedDriver(), consume=False) as agent:
        await until(lambda: agent.leadership.leading, what="the default site's leader")
        proc = agentctl(dsn, "status", "--fleet", "--all-sites", "--json", check=False)
        text = agentctl(dsn, "status", "--fleet", "--all-sites", check=False).stdout
        one = json.loads(agentctl(dsn, "status", "--fleet", "--json", check=False).stdout)
    sites = {s["site"]: s for s in json.loads(proc.stdout)["sites"]}
    assert sorted(sites) == ["default", "north"]
    assert (sites["north"]["queue"], sites["north"]["queue_depth"], sites["north"]["dlq_depth"]) == (NORTH, 2, 1)
    assert sites["north"]["queue_oldest_s"] is not None and sites["north"]["leader"] is None
    assert [(u["device"], u["reason"]) for u in sites["north"]["unreachable"]] == [("n1", "peer down")]
    me = agent.settings.agent_id
    assert sites["default"]["leader"] == me and sites["default"]["agents"] == [me]
    assert "site north: queue north_tasks: 2 messages" in text and "    n1: peer down" in text
    assert [s["site"] for s in one["sites"]] == ["default"]  # AGENT_SITE only, without --all-sites


async def test_inventory_notifications_name_the_sites_whose_devices_changed(db, dsn, north):
    heard: list[str] = []
    listener = await asyncpg.connect(dsn)
    await listener.add_listener("agent_inventory", lambda *args: heard.append(args[3]))
    try:
        async def said(statement: str) -> set[str]:
            heard.clear()
            await db.execute(statement)
            await until(lambda: heard, what="a notification")
            await listener.execute("SELECT 1")  # everything sent before this has arrived
            return set(heard)

        assert await said("INSERT INTO agent.devices (id, driver, site) VALUES ('r2', 'sim', 'default'), "
                          "('n2', 'sim', 'north')") == {"default", "north"}
        assert await said("UPDATE agent.devices SET site = 'north' WHERE id = 'r2'") == {"default", "north"}
        assert await said("UPDATE agent.devices SET options = '{}' WHERE id = 'n1'") == {"north"}
        assert await said("DELETE FROM agent.devices WHERE id = 'n2'") == {"north"}
    finally:
        await listener.close()


async def test_an_agent_reloads_its_inventory_for_its_own_site_only(db, dsn, north):
    async with running_agent(dsn, ScriptedDriver()) as agent:  # site default
        reloads: list[int] = []
        agent.inventory.changed = lambda: reloads.append(1)  # type: ignore[method-assign]
        await add_device(db, "n9", site="north")
        await add_device(db, "r9")
        await until(lambda: reloads, what="its own site's change heard")
        await agent.session.fetchval("SELECT 1")  # the north notification came first, if at all
    assert reloads == [1]


async def test_an_agents_status_shows_the_drift_of_its_own_site_only(db, dsn, north):
    for device in ("r1", "n1"):
        await db.execute("INSERT INTO agent.service_state (device, service, desired, desired_version, observed) "
                         "VALUES ($1, 'wifi', 'on', 1, 'off')", device)
    async with running_agent(dsn) as agent:  # site `default`
        drifted = (await agent.house.snapshot())["drifted"]
    assert [(d["device"], d["service"]) for d in drifted] == [("r1", "wifi")]
