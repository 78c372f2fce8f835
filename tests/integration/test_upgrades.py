"""Upgrades without lockstep: an agent of the previous schema runs against the new one; an agent
newer than the database, or older than the database's minimum, is refused with what to upgrade;
the SQL a DBA applies by hand makes the same database as `db init`."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import asyncpg
import pytest

from agent.db import schema
from agent.db.queries import Queries
from agent.db.schema import SCHEMA_VERSION, check_ready, init_sql, install_pgmq
from agent.errors import ConfigError
from tests.support.agents import agent_env, running_agent
from tests.support.db import add_device, archived, send
from tests.support.devices import ScriptedDriver
from tests.support.pg import create_database, drop_database
from tests.support.wait import until

Q = Queries("device_tasks")
PREVIOUS = schema.migrations()[-2][0]  # the migration before the newest (numbers may skip one)
NEWEST = schema.migrations()[-1][1]


async def pinned_database(dsn: str, upto: int) -> None:
    """A database as `db init` of the release whose newest migration was `upto` left it."""
    conn = await asyncpg.connect(dsn)
    try:
        await install_pgmq(conn)
        await schema._migrate(conn, upto=upto)
        for name in ("device_tasks", "device_tasks_dlq"):
            await conn.execute("SELECT pgmq.create($1)", name)
        await conn.execute("SELECT pgmq.enable_notify_insert('device_tasks', 250)")
        await conn.execute("INSERT INTO agent.config (key, value) VALUES ('default_queue', 'device_tasks') "
                           "ON CONFLICT DO NOTHING")
    finally:
        await conn.close()


async def test_a_migration_merged_after_a_higher_one_is_applied(db, monkeypatch):
    """Migrations written side by side may land in either order: a database that got the higher one
    first gets the lower one from the next db init (db status lists it pending meanwhile)."""
    shipped = schema.migrations()
    beside = [(998, "0998_beside.sql", "CREATE TABLE agent.x_beside (id integer)"),
              (999, "0999_first.sql", "CREATE TABLE agent.x_first (id integer)")]
    monkeypatch.setattr(schema, "migrations", lambda: [*shipped, *beside])
    await db.execute(beside[1][2])
    await db.execute("INSERT INTO agent.schema_version (version, name) VALUES (999, '0999_first.sql')")
    assert (await schema.status(db, Q))["pending"] == ["0998_beside.sql"]
    assert await schema._migrate(db) == ["0998_beside.sql"]
    assert await db.fetchval("SELECT to_regclass('agent.x_beside') IS NOT NULL")
    assert (await schema.status(db, Q))["pending"] == []


async def test_an_agent_of_the_previous_schema_runs_against_the_new_one(db, dsn, monkeypatch, caplog):
    monkeypatch.setattr(schema, "SCHEMA_VERSION", PREVIOUS)  # an agent built from the previous migration set
    await add_device(db, "r1")
    device = ScriptedDriver()
    caplog.set_level(logging.WARNING)
    async with running_agent(dsn, device):
        msg = await send(db, {"device": "r1", "service": "wifi", "state": "on"})
        await until(lambda: archived(db, msg), what="the command done by the older agent")
    assert device.states[("r1", "wifi")] == "on"
    assert any(getattr(r, "action", "") == "schema_newer" for r in caplog.records)


async def test_an_agent_newer_than_the_database_is_told_to_run_db_init(empty_dsn):
    await pinned_database(empty_dsn, PREVIOUS)
    conn = await asyncpg.connect(empty_dsn)
    try:
        with pytest.raises(ConfigError, match=rf"schema is version {PREVIOUS}, .* needs version {SCHEMA_VERSION}: "
                                              r"run `agentctl db init`"):
            await check_ready(conn, "device_tasks")
    finally:
        await conn.close()


async def test_agentd_newer_than_the_database_exits_2_naming_the_remedy(empty_dsn):
    await pinned_database(empty_dsn, PREVIOUS)
    proc = subprocess.run([sys.executable, "-m", "agent"], env=agent_env(empty_dsn), capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and "agentctl db init" in proc.stdout and "Traceback" not in proc.stdout


async def test_an_agent_older_than_the_databases_minimum_is_told_to_upgrade_itself(db, monkeypatch):
    await db.execute("UPDATE agent.config SET value = $1 WHERE key = 'min_agent_schema'", str(SCHEMA_VERSION))
    monkeypatch.setattr(schema, "SCHEMA_VERSION", PREVIOUS)
    with pytest.raises(ConfigError, match=rf"older than the database .* upgrade agentd .* schema >= {SCHEMA_VERSION}"):
        await check_ready(db, "device_tasks")


async def shape(conn: asyncpg.Connection) -> dict[str, object]:
    cols = await conn.fetch("SELECT table_schema, table_name, column_name, data_type, is_nullable FROM "
                            "information_schema.columns WHERE table_schema IN ('agent', 'pgmq') ORDER BY 1, 2, 3")
    procs = await conn.fetch("SELECT p.proname, pg_get_function_identity_arguments(p.oid) AS args FROM pg_proc p "
                             "JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = 'agent' ORDER BY 1, 2")
    opts = await conn.fetch("SELECT c.relname, c.reloptions FROM pg_class c JOIN pg_namespace n ON n.oid = "
                            "c.relnamespace WHERE n.nspname IN ('agent', 'pgmq') AND c.reloptions IS NOT NULL "
                            "ORDER BY 1")
    config = await conn.fetch("SELECT key, value FROM agent.config ORDER BY key")
    versions = await conn.fetch("SELECT version, name FROM agent.schema_version ORDER BY version")
    return {k: [tuple(r) for r in v] for k, v in
            {"cols": cols, "procs": procs, "opts": opts, "config": config, "versions": versions}.items()}


async def test_the_printed_sql_makes_the_same_database_as_db_init(db, pg_admin_dsn):
    by_hand = await create_database(pg_admin_dsn)
    try:
        conn = await asyncpg.connect(by_hand)
        try:
            await install_pgmq(conn)  # the DBA installs PGMQ first
            await conn.execute(init_sql(Q))
            await check_ready(conn, "device_tasks")
            assert await shape(conn) == await shape(db)
        finally:
            await conn.close()
    finally:
        await drop_database(pg_admin_dsn, by_hand)


async def test_the_printed_sql_after_a_version_upgrades_a_database_pinned_there(empty_dsn):
    await pinned_database(empty_dsn, PREVIOUS)
    conn = await asyncpg.connect(empty_dsn)
    try:
        await conn.execute(init_sql(Q, after=PREVIOUS))
        await check_ready(conn, "device_tasks")
        assert await conn.fetchval("SELECT max(version) FROM agent.schema_version") == SCHEMA_VERSION
    finally:
        await conn.close()


def agentctl_json(dsn: str, *args: str) -> tuple[int, dict]:  # type: ignore[type-arg]
    proc = subprocess.run([sys.executable, "-m", "agent.cli.agentctl", *args, "--json"], env=agent_env(dsn),
                          capture_output=True, text=True, timeout=60)
    return proc.returncode, json.loads(proc.stdout)


async def test_db_status_shows_current_pending_and_compatible_versions(dsn):
    code, st = agentctl_json(dsn, "db", "status")
    assert code == 0 and st["version"] == SCHEMA_VERSION and st["pending"] == []
    assert st["min_agent_schema"] <= PREVIOUS and st["this_release"]["problem"] is None


async def test_db_status_of_a_database_behind_this_release(empty_dsn):
    await pinned_database(empty_dsn, PREVIOUS)
    code, st = agentctl_json(empty_dsn, "db", "status")
    assert code == 1 and st["version"] == PREVIOUS and st["pending"] == [NEWEST]
    assert "agentctl db init" in st["this_release"]["problem"]


def test_print_sql_needs_no_database():
    env = {k: v for k, v in agent_env("x").items() if k != "AGENT_DATABASE_URL"} | {"AGENT_CONFIG": ""}
    proc = subprocess.run([sys.executable, "-m", "agent.cli.agentctl", "db", "init", "--print-sql", "--after",
                           str(PREVIOUS)], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert f"-- {NEWEST}" in proc.stdout and f"-- {schema.migrations()[-2][1]}" not in proc.stdout
