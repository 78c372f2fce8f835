"""`agentctl db init`: install PGMQ, apply numbered migrations, create the queues. Idempotent."""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Collection
from importlib.resources import files

import asyncpg

from agent import __version__
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


# PGMQ's SQL-only install script, vendored unmodified from the `pgmq` distribution on PyPI (whose
# Python client would bring psycopg and orjson along): agent/db/vendor/README.md says where from,
# under which licence, and how CI compares it with that release.
PGMQ_SQL_RELEASE = "1.1.4"
PGMQ_SQL_SHA256 = "bf7e66c75ed771df0c5f7cb2b9f0123ca77992daacd56e3911d1894a3efa99de"


def bundled_pgmq_sql() -> str:
    """The SQL-only PGMQ install script vendored in agent/db/vendor."""
    return files("agent.db").joinpath("vendor", "pgmq.sql").read_text(encoding="utf-8")


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


async def init_database(conn: asyncpg.Connection, queue: str, throttle_ms: int = 250,
                        site: str = "default") -> dict[str, object]:
    """Bring the database to the current schema, create the queue (its ids from the sequence all
    agent queues share), its DLQ and notifications, and record the queue as the site's (producers'
    commands for the site's devices are sent there)."""
    q = Queries(queue)
    await conn.execute("SELECT pg_advisory_lock(hashtext($1))", _LOCK)
    try:
        pgmq = await install_pgmq(conn)
        applied = await _migrate(conn)
        async with conn.transaction():
            recorded = await record_site(conn, site, q.queue)
            for name in (q.queue, q.dlq):
                await conn.execute("SELECT pgmq.create($1)", name)
            await conn.execute(q.share_msg_ids, q.queue)
            for index in (q.device_index, q.high_index, q.held_index, q.drop_vt_index, q.archive_index):
                await conn.execute(index)
            for table, options in storage_options(q).items():
                await conn.execute(f"ALTER TABLE {table} SET ({options})")
            await conn.execute(q.queue_lock, q.queue)
            await conn.execute(q.enable_notify, q.queue, throttle_ms)
            await conn.execute(
                "INSERT INTO agent.config (key, value) VALUES ('default_queue', $1) ON CONFLICT DO NOTHING",
                q.queue,
            )
        roles = await ensure_roles(conn, q, site)
    finally:
        await conn.execute("SELECT pg_advisory_unlock(hashtext($1))", _LOCK)
    return {"pgmq": pgmq, "migrations_applied": applied, "schema_version": SCHEMA_VERSION,
            "queue": q.queue, "dlq": q.dlq, "roles": roles, "site": site, "site_recorded": recorded,
            "worker_role": worker_role(site)}


async def record_site(conn: asyncpg.Connection, site: str, queue: str) -> bool:
    """site -> queue in agent.sites (True when new). A different pairing is a ConfigError that
    says what is recorded: a site has one queue, a queue one site."""
    if problem := site_name_problem(site):
        raise ConfigError(problem)
    try:
        return bool(await conn.fetchval("SELECT agent.record_site($1, $2)", site, queue))
    except asyncpg.InvalidParameterValueError as exc:
        raise ConfigError(f"{exc}; {exc.hint}" if exc.hint else str(exc)) from None


def site_name_problem(site: str) -> str | None:
    """What AGENT_SITE accepts (and agent.sites checks): 1 to 64 characters, none of them control."""
    if not 1 <= len(site) <= 64:
        return f"site name {site!r} must be 1 to 64 characters"
    if any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in site):
        return f"site name {site!r} must not contain control characters"
    return None


def site_problem(site: str, queue: str, rows: list[tuple[str, str]]) -> str | None:
    """Whether an agent of `site` may consume `queue`, given the agent.sites rows that name either
    (pure). None when it may: the pairing is recorded, or neither is (a site not recorded yet)."""
    for name, recorded in rows:
        if name == site and recorded != queue:
            return (f"AGENT_QUEUE is {queue!r}, but site {site!r} (AGENT_SITE) records queue {recorded!r}: "
                    f"set AGENT_QUEUE={recorded}, or AGENT_SITE to the site this agent serves")
    for name, recorded in rows:
        if name != site and recorded == queue:
            return (f"AGENT_QUEUE {queue!r} is the queue of site {name!r}, not of {site!r} (AGENT_SITE): set "
                    f"AGENT_SITE={name}, or give site {site!r} its own queue (agentctl db init --site {site} "
                    "--queue <name>) and set AGENT_QUEUE to it")
    return None


async def check_site(conn: asyncpg.Connection, site: str, queue: str) -> None:
    """At start: refuse to consume a queue other than the one recorded for the agent's site, or
    another site's queue (its commands would all be moved away or dead-lettered)."""
    rows = [(r["name"], r["queue"]) for r in await conn.fetch(Queries(queue).site_routes, site, queue)]
    if problem := site_problem(site, queue, rows):
        raise ConfigError(problem)
    if not rows:
        log.warning("site %r has no queue recorded: producers' commands for its devices go to the default "
                    "queue; run `agentctl db init --site %s --queue %s`", site, site, queue,
                    extra={"action": "site_unrecorded", "site": site, "queue": queue})


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


ROLES = ("agent_producer", "agent_worker", "agent_worker_common")
_ROLE_SAFE = re.compile(r"^[a-z0-9_]{1,49}$")


def worker_role(site: str) -> str:
    """The NOLOGIN role of one site's agents (pure): agent_worker_<site> for a site named in lower-case
    letters, digits and _ (up to 49), else a slug of the name and 8 hex digits of its SHA-256, so
    every site has its own role and every role name is a plain identifier of at most 62 characters."""
    if _ROLE_SAFE.match(site) and site != "common":  # agent_worker_common is every site's
        return f"agent_worker_{site}"
    slug = re.sub(r"[^a-z0-9_]+", "_", site.lower()).strip("_")[:40]
    return f"agent_worker_{slug + '_' if slug else ''}{hashlib.sha256(site.encode()).hexdigest()[:8]}"


def _sections() -> dict[str, str]:
    text = files("agent.db").joinpath("roles.sql").read_text()
    parts = re.split(r"^-- section: (\w+)\s*$", text, flags=re.M)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts), 2)}


def roles_sql(q: Queries, site: str = "default", without: Collection[str] = (), member: bool = True) -> str:
    """The grants of the group roles for one queue and its site (agent/db/roles.sql, identifiers
    filled in): agent_worker and the site's role get the queue, the site's role its site's rows.
    `without`: roles missing (an owner without CREATEROLE could not make them), whose grants are left
    out so that the others' still apply; `member`: grant the site's role agent_worker_common."""
    idents = {"q": f"q_{q.queue}", "a": f"a_{q.queue}", "dq": f"q_{q.dlq}", "da": f"a_{q.dlq}",
              "qs": f"q_{q.queue}_msg_id_seq", "dqs": f"q_{q.dlq}_msg_id_seq"}
    sections = _sections()

    def fill(text: str, role: str) -> str:
        for key, name in idents.items():
            text = text.replace("{" + key + "}", quote_ident(name))
        return text.replace("{role}", quote_ident(role)).replace("{site}", _literal(site))

    mine = worker_role(site)
    common = sections["common"]
    if "agent_worker_common" in without:
        common = common.replace(", agent_worker_common", "")
    parts = [common, fill(sections["queue"], "agent_worker")]
    if mine not in without and "agent_worker_common" not in without:
        parts += [fill(sections["queue"], mine), *([fill(sections["member"], mine)] if member else []),
                  fill(sections["site"], mine)]
    return "".join(parts)


async def ensure_roles(conn: asyncpg.Connection, q: Queries, site: str = "default") -> str:
    """Create the NOLOGIN group roles if missing (the site's among them) and (re)apply their grants.
    Returns what was done. Without CREATEROLE the roles must be made by a superuser (the message
    says how); the grants of those that exist are applied meanwhile, so an upgrade never leaves
    agent_worker without what the new release needs."""
    mine = worker_role(site)
    wanted = (*ROLES, mine)
    missing = [r for r in wanted if not await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", r)]
    cannot = []
    for role in missing:
        try:
            await conn.execute(f"CREATE ROLE {quote_ident(role)} NOLOGIN")
        except asyncpg.DuplicateObjectError:  # made meanwhile by a concurrent init
            pass
        except asyncpg.InsufficientPrivilegeError:
            cannot.append(role)
    if cannot:
        log.warning("cannot create role(s) %s (no CREATEROLE): ask a superuser to run %s; then run agentctl "
                    "db init again", ", ".join(cannot), " ".join(f"CREATE ROLE {quote_ident(r)} NOLOGIN;"
                                                              for r in cannot),
                    extra={"action": "roles_missing"})
    if {"agent_producer", "agent_worker"} & set(cannot):
        return "missing: " + ", ".join(cannot)
    grant = f"GRANT agent_worker_common TO {quote_ident(mine)}"
    if not cannot and not await conn.fetchval("SELECT pg_has_role($1, 'agent_worker_common', 'MEMBER')", mine):
        try:
            await conn.execute(grant)
        except asyncpg.InsufficientPrivilegeError:
            log.warning("cannot make role %s a member of agent_worker_common (no ADMIN option on it): ask a "
                        "superuser to run %s; then run agentctl db init again", mine, grant,
                        extra={"action": "roles_missing"})
            cannot.append(f"{mine} in agent_worker_common")
    async with conn.transaction():
        await conn.execute(roles_sql(q, site, without=cannot, member=False))
    if cannot:
        return "missing: " + ", ".join(cannot)
    return "created " + ", ".join(missing) if missing else "present"


_VERSION_TABLE = ("CREATE TABLE IF NOT EXISTS agent.schema_version ("
                  " version integer PRIMARY KEY, name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())")


async def _migrate(conn: asyncpg.Connection, upto: int | None = None) -> list[str]:
    """Apply the migrations not applied yet, in order (up to `upto`: tests pin an older schema with
    it). Not applied means not recorded: a migration numbered below one applied already (written
    beside it, merged after it) is applied too, as `db status` lists it pending."""
    await conn.execute("CREATE SCHEMA IF NOT EXISTS agent")
    await conn.execute(_VERSION_TABLE)
    done = {r[0] for r in await conn.fetch("SELECT version FROM agent.schema_version")}
    applied = []
    for version, name, sql in migrations():
        if version in done or (upto is not None and version > upto):
            continue
        async with conn.transaction():
            await conn.execute(sql)
            await conn.execute("INSERT INTO agent.schema_version (version, name) VALUES ($1, $2)", version, name)
        log.info("migration applied", extra={"action": "migrate", "migration": name})
        applied.append(name)
    return applied


def compatibility(agent: int, database: int, min_agent: int | None) -> str | None:
    """Whether an agent built for schema `agent` may run against a database at `database` that
    serves agents from `min_agent` on (pure). None when it may; otherwise what to upgrade.

    Migrations expand, then contract: schema N keeps what agents of N-1 use, and records the oldest
    agent schema it serves. An agent newer than the database needs the migration first; one older
    than the database's minimum needs upgrading itself (running `db init` cannot help it)."""
    if agent == database:
        return None
    if agent > database:
        return (f"the database schema is version {database}, this agent ({__version__}) needs version {agent}: "
                f"run `agentctl db init` of this release as the database owner (agents of schema "
                f"{min_agent if min_agent is not None else database} and newer keep working meanwhile), "
                "or print its SQL for a DBA with `agentctl db init --print-sql`")
    oldest = database if min_agent is None else min_agent
    if agent >= oldest:
        return None
    return (f"this agent ({__version__}, schema {agent}) is older than the database (schema {database}), which "
            f"serves agents of schema {oldest} and newer: upgrade agentd on this host to a release with schema "
            f">= {oldest} (see CHANGELOG.md); `agentctl db init` cannot help")


async def check_ready(conn: asyncpg.Connection, queue: str, site: str | None = None) -> None:
    """Refuse to run against a database `db init` has not prepared, or whose schema this agent
    cannot use (ConfigError says what to upgrade), or (with `site`) a queue not the site's."""
    q = Queries(queue)
    if not await conn.fetchval("SELECT to_regclass('pgmq.meta') IS NOT NULL"):
        raise ConfigError("PGMQ is not installed in this database: run `agentctl db init`")
    if not await conn.fetchval("SELECT to_regclass('agent.schema_version') IS NOT NULL"):
        raise ConfigError("schema `agent` is missing: run `agentctl db init`")
    row = await conn.fetchrow(q.schema_compat)
    if problem := compatibility(SCHEMA_VERSION, row["version"], row["min_agent"]):
        raise ConfigError(problem)
    if row["version"] > SCHEMA_VERSION:
        log.warning("the database schema (%d) is newer than this agent's (%d), which it still serves: "
                    "upgrade agentd when convenient", row["version"], SCHEMA_VERSION,
                    extra={"action": "schema_newer"})
    if not await conn.fetchval(q.queue_exists, q.queue, q.dlq):
        raise ConfigError(
            f"queue {q.queue!r} or {q.dlq!r} is missing: run `agentctl db init` with AGENT_QUEUE={q.queue}")
    if not await conn.fetchval(q.msg_ids_shared, q.queue):
        raise ConfigError(
            f"queue {q.queue!r} does not take its ids from agent.msg_id_seq (it was created by an older "
            f"agentctl), so its commands' versions cannot be compared with other queues': run `agentctl db init` "
            f"of this release with AGENT_QUEUE={q.queue}")
    if site is not None:
        await check_site(conn, site, queue)
        if not await conn.fetchval(q.may_consume, q.queue, q.dlq):
            user = await conn.fetchval("SELECT current_user")
            raise ConfigError(
                f"role {user!r} may not read and settle queue {q.queue!r} (and its DLQ): run agentd as a member of "
                f"the site's role, GRANT {quote_ident(worker_role(site))} TO {quote_ident(user)}; (made by "
                f"`agentctl db init --site {site} --queue {q.queue}`, see docs/operations.md#security)")


def init_sql(q: Queries, throttle_ms: int = 250, after: int = 0, site: str = "default") -> str:
    """What `db init` does, as a script for a DBA to apply with psql as the database owner: the
    migrations after version `after` (each in its transaction, recorded in agent.schema_version),
    then the site's queue, its DLQ, notifications, storage parameters and the roles. PGMQ must be there."""
    if problem := site_name_problem(site):
        raise ConfigError(problem)
    parts = [f"-- pgmq-edge-agent {__version__}: schema version {SCHEMA_VERSION}"
             f" (migrations after {after}), site {site}, queue {q.queue}.",
             "-- Apply as the database owner: psql -v ON_ERROR_STOP=1 -f <this file>",
             "-- PGMQ must be installed first: CREATE EXTENSION pgmq; (or the SQL of the `pgmq` package)",
             "CREATE SCHEMA IF NOT EXISTS agent;", _VERSION_TABLE + ";"]
    for version, name, sql in migrations():
        if version > after:
            parts += [f"\n-- {name}", "BEGIN;", sql.strip(),
                      f"INSERT INTO agent.schema_version (version, name) VALUES ({version}, '{name}');", "COMMIT;"]
    lit = f"'{q.queue}'"  # validated by Settings: lower-case letters, digits and _
    parts += ["\n-- the site's queue, dead-letter queue, insert notifications, storage parameters", "BEGIN;",
              f"SELECT agent.record_site({_literal(site)}, {lit});",
              f"SELECT pgmq.create({lit});", f"SELECT pgmq.create('{q.dlq}');",
              f"SELECT agent.share_msg_ids({lit});",
              *(index + ";" for index in (q.device_index, q.high_index, q.held_index, q.drop_vt_index,
                                          q.archive_index)),
              *(f"ALTER TABLE {t} SET ({o});" for t, o in storage_options(q).items()),
              f"SELECT pgmq.enable_notify_insert({lit}, {int(throttle_ms)});",
              f"INSERT INTO agent.config (key, value) VALUES ('default_queue', {lit}) ON CONFLICT DO NOTHING;",
              "COMMIT;", "\n-- roles (see docs/operations.md#security)",
              "DO $$ BEGIN", *(f"  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{r}') THEN "
                               f"CREATE ROLE {quote_ident(r)} NOLOGIN; END IF;" for r in (*ROLES, worker_role(site))),
              "END $$;",
              "BEGIN;", roles_sql(q, site).strip(), "COMMIT;"]
    return "\n".join(parts) + "\n"


def _literal(text: str) -> str:
    """An SQL string literal that reads the same whatever standard_conforming_strings is."""
    if "\\" in text:
        return "E'" + text.replace("\\", "\\\\").replace("'", "''") + "'"
    return "'" + text.replace("'", "''") + "'"


async def status(conn: asyncpg.Connection, q: Queries) -> dict[str, object]:
    """`agentctl db status`: applied and pending migrations, the agents served, the agents seen."""
    if not await conn.fetchval("SELECT to_regclass('agent.schema_version') IS NOT NULL"):
        return {"version": 0, "applied": [], "pending": [n for _v, n, _s in migrations()], "min_agent_schema": None,
                "this_release": {"version": __version__, "schema": SCHEMA_VERSION,
                                 "problem": "schema `agent` is missing: run `agentctl db init`"}, "agents": []}
    row = await conn.fetchrow(q.schema_compat)
    applied = [dict(r) for r in await conn.fetch(q.applied_migrations)]
    done = {r["version"] for r in applied}
    seen = await conn.fetchval("SELECT to_regclass('agent.agents') IS NOT NULL")
    agents = [dict(r) for r in await conn.fetch(q.agents_seen)] if seen else []
    return {"version": row["version"], "applied": applied,
            "pending": [n for v, n, _s in migrations() if v not in done], "min_agent_schema": row["min_agent"],
            "this_release": {"version": __version__, "schema": SCHEMA_VERSION,
                             "problem": compatibility(SCHEMA_VERSION, row["version"], row["min_agent"])},
            "agents": agents}


async def ensure_notify(conn: asyncpg.Connection, queue: str, throttle_ms: int) -> bool:
    """Re-enable insert notifications if a crash emptied PGMQ's UNLOGGED throttle table.

    Returns True when they had to be re-enabled. agent.ensure_notify (SECURITY DEFINER) does it
    under PGMQ's queue lock, since two concurrent enables collide, with the rights of the queue's
    owner: an agent running as agent_worker may not create the trigger itself.
    """
    return bool(await conn.fetchval("SELECT agent.ensure_notify($1, $2)", queue, throttle_ms))

