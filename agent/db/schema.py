"""`agentctl db init`: install PGMQ, apply numbered migrations, create the queues. Idempotent."""

from __future__ import annotations

import logging
import re
from importlib.metadata import PackageNotFoundError, distribution
from importlib.resources import files
from pathlib import Path

import asyncpg

from agent.db.queries import Queries, quote_ident
from agent.errors import ConfigError

log = logging.getLogger("agent.db")
_LOCK = "agent.db_init"
_MIGRATION = re.compile(r"^(\d{4})_[\w-]+\.sql$")


def migrations() -> list[tuple[int, str, str]]:
    """(version, file name, SQL) of every migration shipped in agent/db/migrations, in order."""
    found = []
    for entry in files("agent.db").joinpath("migrations").iterdir():
        m = _MIGRATION.match(entry.name)
        if m:
            found.append((int(m.group(1)), entry.name, entry.read_text()))
    return sorted(found)


SCHEMA_VERSION = migrations()[-1][0]


def bundled_pgmq_sql() -> str:
    """The SQL-only PGMQ install script shipped inside the `pgmq` distribution (not imported)."""
    try:
        dist = distribution("pgmq")
    except PackageNotFoundError:
        raise ConfigError("PGMQ is not installed in the database and the `pgmq` package is missing") from None
    path = Path(str(dist.locate_file("pgmq/sql/pgmq.sql")))
    if not path.is_file():
        raise ConfigError(f"the installed `pgmq` package has no bundled SQL at {path}")
    return path.read_text(encoding="utf-8")


async def install_pgmq(conn: asyncpg.Connection) -> str:
    """Make PGMQ available; say how: 'extension', 'sql' (bundled script) or 'present'."""
    if await conn.fetchval("SELECT to_regclass('pgmq.meta') IS NOT NULL"):
        return "present"
    if await conn.fetchval("SELECT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'pgmq')"):
        await conn.execute("CREATE EXTENSION IF NOT EXISTS pgmq")
        return "extension"
    async with conn.transaction():
        await conn.execute(bundled_pgmq_sql())
    return "sql"


async def init_database(conn: asyncpg.Connection, queue: str, throttle_ms: int = 250) -> dict[str, object]:
    """Bring the database to the current schema and create the queue, its DLQ and notifications."""
    q = Queries(queue)
    await conn.execute("SELECT pg_advisory_lock(hashtext($1))", _LOCK)
    try:
        pgmq = await install_pgmq(conn)
        applied = await _migrate(conn)
        async with conn.transaction():
            for name in (q.queue, q.dlq):
                await conn.execute("SELECT pgmq.create($1)", name)
            for table, options in storage_options(q).items():
                await conn.execute(f"ALTER TABLE {table} SET ({options})")
            await conn.execute(q.queue_lock, q.queue)
            await conn.execute(q.enable_notify, q.queue, throttle_ms)
            await conn.execute(
                "INSERT INTO agent.config (key, value) VALUES ('default_queue', $1) ON CONFLICT DO NOTHING",
                q.queue,
            )
        roles = await ensure_roles(conn, q)
    finally:
        await conn.execute("SELECT pg_advisory_unlock(hashtext($1))", _LOCK)
    return {"pgmq": pgmq, "migrations_applied": applied, "schema_version": SCHEMA_VERSION,
            "queue": q.queue, "dlq": q.dlq, "roles": roles}


# Autovacuum for tables that churn. PGMQ rewrites a queue row on every read (read_ct, vt): room on
# the page for HOT updates and a vacuum after 1 % dead rows, as pgqueuer ships. Archives and the
# audit tables are appended to and pruned in batches: vacuum after 5 % dead rows and after
# inserts, so their visibility maps stay current. service_state and device_claims are updated in place.
_QUEUE = ("fillfactor = 70, autovacuum_vacuum_scale_factor = 0.01, autovacuum_analyze_scale_factor = 0.02, "
          "autovacuum_vacuum_threshold = 100")
_PRUNED = ("autovacuum_vacuum_scale_factor = 0.05, autovacuum_vacuum_insert_scale_factor = 0.05, "
           "autovacuum_analyze_scale_factor = 0.05")
_UPDATED = "fillfactor = 80, autovacuum_vacuum_scale_factor = 0.02, autovacuum_analyze_scale_factor = 0.05"


def storage_options(q: Queries) -> dict[str, str]:
    """table -> storage parameters `db init` sets (idempotent)."""
    pgmq = {f"q_{q.queue}": _QUEUE, f"q_{q.dlq}": _QUEUE, f"a_{q.queue}": _PRUNED, f"a_{q.dlq}": _PRUNED}
    return {**{f"pgmq.{quote_ident(t)}": o for t, o in pgmq.items()},
            "agent.events": _PRUNED, "agent.requests": _PRUNED, "agent.sync_items": _PRUNED,
            "agent.service_state": _UPDATED, "agent.device_claims": _UPDATED, "agent.agents": _UPDATED}


ROLES = ("agent_producer", "agent_worker")


def roles_sql(q: Queries) -> str:
    """The grants of the two group roles for one queue (agent/db/roles.sql, identifiers filled in)."""
    text = files("agent.db").joinpath("roles.sql").read_text()
    idents = {"q": f"q_{q.queue}", "a": f"a_{q.queue}", "dq": f"q_{q.dlq}", "da": f"a_{q.dlq}",
              "qs": f"q_{q.queue}_msg_id_seq", "dqs": f"q_{q.dlq}_msg_id_seq"}
    for key, name in idents.items():
        text = text.replace("{" + key + "}", quote_ident(name))
    return text.replace("{queue}", q.queue)


async def ensure_roles(conn: asyncpg.Connection, q: Queries) -> str:
    """Create the NOLOGIN group roles if missing and (re)apply their grants. Returns what was done;
    without CREATEROLE the roles must be made by a superuser (the message says how)."""
    missing = [r for r in ROLES if not await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", r)]
    for role in missing:
        try:
            await conn.execute(f"CREATE ROLE {role} NOLOGIN")
        except asyncpg.DuplicateObjectError:  # made meanwhile by a concurrent init
            pass
        except asyncpg.InsufficientPrivilegeError:
            log.warning("cannot create role %s (no CREATEROLE): ask a superuser to run "
                        "CREATE ROLE %s NOLOGIN; then run agentctl db init again", role, role,
                        extra={"action": "roles_missing"})
            return "missing: " + ", ".join(missing)
    async with conn.transaction():
        await conn.execute(roles_sql(q))
    return "created " + ", ".join(missing) if missing else "present"


async def _migrate(conn: asyncpg.Connection) -> list[str]:
    await conn.execute("CREATE SCHEMA IF NOT EXISTS agent")
    await conn.execute(
        "CREATE TABLE IF NOT EXISTS agent.schema_version ("
        " version integer PRIMARY KEY, name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
    )
    current = await conn.fetchval("SELECT coalesce(max(version), 0) FROM agent.schema_version")
    applied = []
    for version, name, sql in migrations():
        if version <= current:
            continue
        async with conn.transaction():
            await conn.execute(sql)
            await conn.execute("INSERT INTO agent.schema_version (version, name) VALUES ($1, $2)", version, name)
        log.info("migration applied", extra={"action": "migrate", "migration": name})
        applied.append(name)
    return applied


async def check_ready(conn: asyncpg.Connection, queue: str) -> None:
    """Refuse to run against a database `db init` has not prepared (ConfigError says what to do)."""
    q = Queries(queue)
    if not await conn.fetchval("SELECT to_regclass('pgmq.meta') IS NOT NULL"):
        raise ConfigError("PGMQ is not installed in this database: run `agentctl db init`")
    if not await conn.fetchval("SELECT to_regclass('agent.schema_version') IS NOT NULL"):
        raise ConfigError("schema `agent` is missing: run `agentctl db init`")
    version = await conn.fetchval(q.schema_version)
    if version != SCHEMA_VERSION:
        raise ConfigError(
            f"database schema is version {version}, this agent needs {SCHEMA_VERSION}: run `agentctl db init`"
        )
    if not await conn.fetchval(q.queue_exists, q.queue, q.dlq):
        raise ConfigError(
            f"queue {q.queue!r} or {q.dlq!r} is missing: run `agentctl db init` with AGENT_QUEUE={q.queue}")


async def ensure_notify(conn: asyncpg.Connection, queue: str, throttle_ms: int) -> bool:
    """Re-enable insert notifications if a crash emptied PGMQ's UNLOGGED throttle table.

    Returns True when they had to be re-enabled. agent.ensure_notify (SECURITY DEFINER) does it
    under PGMQ's queue lock, since two concurrent enables collide, with the rights of the queue's
    owner: an agent running as agent_worker may not create the trigger itself.
    """
    return bool(await conn.fetchval("SELECT agent.ensure_notify($1, $2)", queue, throttle_ms))

