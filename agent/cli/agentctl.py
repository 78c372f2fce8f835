"""`agentctl`: database set-up, inventory, commands and the dead-letter queue."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg

from agent import __version__
from agent.cli import args as argtypes
from agent.cli import exits
from agent.cli import guard as guard_cli
from agent.cli import status as status_cli
from agent.cli import sync as sync_cli
from agent.contract import json_schema
from agent.db import retention
from agent.db.connect import classify as classify_connect_error
from agent.db.connect import redact
from agent.db.identity import STALE_FACTOR
from agent.db.queries import Queries, quote_ident
from agent.db.retention import Retention
from agent.db.schema import init_database, init_sql
from agent.db.schema import status as schema_status
from agent.errors import AgentError, ConfigError, NotFoundError
from agent.model.device import Device
from agent.ops import admin, devicetest
from agent.settings import CONFIG_ENV, DEFAULT_CONFIG, Settings, config_path, load_settings
from agent.text import clean, dumps, local_time

Handler = Callable[[asyncpg.Connection, Settings, argparse.Namespace], Awaitable[int]]


def _print(rows: list[dict[str, Any]], as_json: bool, columns: list[str]) -> None:
    """JSON for machines (times RFC 3339 UTC) or a table for people (times in their zone, labelled)."""
    if as_json:
        print(dumps(rows))
        return
    if not rows:
        print("(none)")
        return
    table = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in table)) for i, c in enumerate(columns)]
    print("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths)))
    for row in table:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())


def _cell(v: Any) -> str:
    """One table cell: values from messages and devices are escaped so they cannot drive the terminal."""
    if v is None:
        return "-"
    if isinstance(v, datetime):
        return local_time(v)
    if isinstance(v, (dict, list)):
        return clean(json.dumps(v, separators=(",", ":")), 2000)
    return clean(v, 2000)


async def db_init(conn: asyncpg.Connection | None, s: Settings, a: argparse.Namespace) -> int:
    site, queue = a.site or s.site, a.queue or s.queue
    if a.print_sql:
        print(init_sql(Queries(queue), s.notify_throttle_ms, a.after, site), end="")
        return 0
    assert conn is not None
    try:
        result = await init_database(conn, queue, s.notify_throttle_ms, site)
    except asyncpg.InsufficientPrivilegeError as exc:
        user = await conn.fetchval("SELECT current_user")
        raise ConfigError(f"db init must run as the database owner, not as {user!r} ({exc}): run it with an "
                          "AGENT_DATABASE_URL of the role that owns the database, or give a DBA its SQL: "
                          "`agentctl db init --print-sql`") from None
    applied = ", ".join(result["migrations_applied"]) or "none (already current)"  # type: ignore[arg-type]
    print(f"PGMQ: {result['pgmq']}; migrations applied: {applied}; schema version {result['schema_version']}")
    print(f"queue {result['queue']} and dead-letter queue {result['dlq']} ready, insert notifications on")
    print(f"site {site}: commands for its devices go to queue {queue}"
          + (" (recorded now)" if result["site_recorded"] else ""))
    print(f"site {site}: its agents log in as members of role {result['worker_role']} "
          f"(GRANT {quote_ident(str(result['worker_role']))} TO <agentd login>; roles: {result['roles']})")
    return 0


async def db_status(conn: asyncpg.Connection, s: Settings, a: argparse.Namespace) -> int:
    """Exit 1 when migrations are pending or this release cannot run against the database."""
    st = await schema_status(conn, Queries(s.queue))
    mine: dict[str, Any] = st["this_release"]  # type: ignore[assignment]
    if a.json:
        print(dumps(st))
    else:
        applied: list[dict[str, Any]] = st["applied"]  # type: ignore[assignment]
        last = applied[-1] if applied else None
        print(f"schema    version {st['version']}" + (f" ({last['name']}, applied {local_time(last['applied_at'])})"
                                                      if last else ""))
        print(f"pending   {', '.join(st['pending']) or 'none'}")  # type: ignore[arg-type]
        oldest = st["min_agent_schema"] if st["min_agent_schema"] is not None else st["version"]
        print(f"serves    agents of schema {oldest} and newer")
        print(f"this      pgmq-edge-agent {mine['version']} (schema {mine['schema']}): "
              + (mine["problem"] or "compatible"))
        agents: list[dict[str, Any]] = st["agents"]  # type: ignore[assignment]
        print("agents    " + ("" if agents else "none"))
        for r in agents:
            built = f"schema {r['schema']}" if r["schema"] is not None else "schema unknown (before 12)"
            print(f"  {clean(r['agent_id'])} (site {clean(r['site'])}): {clean(r['version'])}, {built}, {r['state']}")
    return 1 if st["pending"] or mine["problem"] else 0


async def db_prune(conn: asyncpg.Connection, s: Settings, a: argparse.Namespace) -> int:
    """What agentd's leaders do in small batches, all at once; --dry-run counts what would go."""
    r, q = Retention.from_settings(s), Queries(s.queue)
    counts = await retention.due(conn, q, r) if a.dry_run else await retention.prune(conn, q, r, None,
                                                                                     max_batches=None, pause=0)
    if a.json:
        print(dumps({"dry_run": a.dry_run, "rows": counts}))
        return 0
    verb = "would remove" if a.dry_run else "removed"
    for table in retention.TABLES:
        kept = f"kept {r.days(table)} days" if r.days(table) else "kept forever"
        print(f"{table:<12} {verb} {counts[table]:>8} ({kept})" if table in counts else f"{table:<12} {kept}")
    return 0


async def device_add(conn: asyncpg.Connection, s: Settings, a: argparse.Namespace) -> int:
    options = dict(admin.parse_option(o) for o in a.option)
    dev = Device(a.id, a.driver, a.address, a.site or s.site, options, a.credential)
    await admin.check_sites(conn, Queries(s.queue), {dev.site})
    await admin.upsert_devices(conn, [dev])
    print(f"device {dev.id} saved (driver {dev.driver}, site {dev.site})")
    if s.require_vpn and dev.address:
        await _warn_route(s, dev)
    return 0


async def _warn_route(s: Settings, dev: Device) -> None:
    """A device whose address is not routed through the tunnel (a typo, a missing AllowedIPs) is
    parked by the agent (`route_not_via_tunnel`): say so now, as seen from where agentctl runs."""
    from agent.ops.doctor import tunnel_checks

    found: list[Any] = []
    try:
        await tunnel_checks(s, [dev], found.append)
    except Exception as exc:  # best effort: the device is saved whatever this look finds (or cannot do)
        print(f"agentctl: note: could not check the route to {dev.id} from this host: {clean(str(exc), 200)}",
              file=sys.stderr)
        return
    for check in found:
        if check.name == f"route to {dev.id}" and not check.ok:
            print(f"agentctl: warning: {check.detail} (as seen from this host): the agent parks this device's work "
                  f"until its route goes through the tunnel; {check.remedy or ''}".rstrip("; "), file=sys.stderr)


async def device_list(conn: asyncpg.Connection, s: Settings, a: argparse.Namespace) -> int:
    rows = await admin.list_devices(conn, None if a.all_sites else s.site)
    _print(rows, a.json, ["id", "driver", "address", "site", "credential", "paused", "options"])
    return 0


def _no_device(device_id: str) -> NotFoundError:
    return NotFoundError(f"no device {device_id!r} (see agentctl device list --all-sites)")


async def device_remove(conn: asyncpg.Connection, s: Settings, a: argparse.Namespace) -> int:
    removed, forgotten = await admin.remove_device(conn, Queries(s.queue), a.id, admin.operator())
    if not removed and not forgotten:
        raise _no_device(a.id)
    keys = f"{forgotten} service key(s) forgotten (recorded as `forgotten` events)"
    print(f"device {a.id} removed; {keys}" if removed else f"device {a.id} was removed before; {keys}")
    return 0


async def service_forget(conn: asyncpg.Connection, s: Settings, a: argparse.Namespace) -> int:
    await admin.forget_service(conn, Queries(s.queue), a.device, a.service, admin.operator())
    print(f"{a.device}/{a.service} forgotten: reconciliation no longer enforces it (nothing sent to the device)")
    return 0


async def device_pause(conn: asyncpg.Connection, s: Settings, a: argparse.Namespace) -> int:
    if not await admin.pause_device(conn, Queries(s.queue), a.id, a.reason):
        raise _no_device(a.id)
    print(f"device {a.id} paused ({a.reason}): its commands wait, parked, until `agentctl device resume {a.id}`")
    return 0


async def device_resume(conn: asyncpg.Connection, s: Settings, a: argparse.Namespace) -> int:
    if not await admin.resume_device(conn, Queries(s.queue), a.id):
        raise _no_device(a.id)
    print(f"device {a.id} resumed: its parked commands go now")
    return 0


async def agent_forget(conn: asyncpg.Connection, s: Settings, a: argparse.Namespace) -> int:
    await admin.forget_agent(conn, a.id, STALE_FACTOR * s.heartbeat_interval)
    print(f"agent {clean(a.id)} forgotten: it no longer shows in `agentctl status --fleet`")
    return 0


async def events(conn: asyncpg.Connection, s: Settings, a: argparse.Namespace) -> int:
    rows = await conn.fetch(Queries(s.queue).events, a.request_id, a.device, a.since, a.limit)
    _print([dict(r) for r in reversed(rows)], a.json,
           ["at", "kind", "device", "service", "request_id", "msg_id", "attempt", "desired", "observed", "applied_at",
            "error"])
    return 0


async def device_import(conn: asyncpg.Connection, s: Settings, a: argparse.Namespace) -> int:
    devices = admin.read_device_file(Path(a.file), s.site)
    await admin.check_sites(conn, Queries(s.queue), {d.site for d in devices})
    await admin.upsert_devices(conn, devices)
    print(f"{len(devices)} device(s) imported from {a.file}")
    return 0


async def enqueue(conn: asyncpg.Connection, s: Settings, a: argparse.Namespace) -> int:
    msg_id = await admin.enqueue(conn, a.queue, a.device, a.service, a.state, request_id=a.request_id,
                                 not_after=a.not_after, meta=a.meta, delay=a.delay, priority=a.priority,
                                 batch=a.batch)  # unknown device: exit 4
    print(msg_id)
    return 0


BATCH_FIELDS = ["batch", "total", "verified", "superseded", "failed", "held", "discarded", "duplicate", "expired",
                "pending", "first_enqueued_at", "last_settled_at"]


async def batch_show(conn: asyncpg.Connection, s: Settings, a: argparse.Namespace) -> int:
    st = await admin.batch_status(conn, a.name)
    if st is None:
        raise NotFoundError(f"no batch {clean(a.name, 200)!r} (never enqueued, or pruned by retention)")
    if a.json:
        print(dumps(st))
        return 0
    width = max(map(len, BATCH_FIELDS))
    for k in BATCH_FIELDS:
        print(f"{k.replace('_', ' ')}:".ljust(width + 2) + _cell(st[k]))
    return 0


async def dlq_list(conn: asyncpg.Connection, s: Settings, a: argparse.Namespace) -> int:
    rows = await admin.dlq_list(conn, Queries(s.queue), a.limit)
    _print(rows, a.json, ["dlq_id", "enqueued_at", "origin_msg_id", "reason", "message"])
    return 0


async def dlq_replay(conn: asyncpg.Connection, s: Settings, a: argparse.Namespace) -> int:
    if not a.ids and not a.all:
        print("agentctl: name DLQ ids to replay, or --all", file=sys.stderr)
        return 2
    moved = await admin.dlq_replay(conn, Queries(s.queue), None if a.all else a.ids, admin.operator())
    for dlq_id, new_id in moved:
        print(f"replayed DLQ entry {dlq_id} as message {new_id}")
    if not moved:
        print("(nothing to replay)")
    return 0


async def dlq_drop(conn: asyncpg.Connection, s: Settings, a: argparse.Namespace) -> int:
    for dlq_id in await admin.dlq_drop(conn, Queries(s.queue), a.ids, a.reason, admin.operator()):
        print(f"dropped DLQ entry {dlq_id} (archived; a `dropped` event records who and why)")
    return 0


async def state(conn: asyncpg.Connection, s: Settings, a: argparse.Namespace) -> int:
    rows = await admin.states(conn, a.device)
    _print(rows, a.json, ["device", "service", "desired", "observed", "version", "failed", "verified_at", "last_error"])
    return 0


async def status(conn: asyncpg.Connection | None, s: Settings, a: argparse.Namespace) -> int:
    if a.fleet:
        assert conn is not None
        return await status_cli.fleet(conn, s, a.json, a.all_sites)
    return await status_cli.local(s, a.json, a.url)


async def sync(conn: asyncpg.Connection, s: Settings, a: argparse.Namespace) -> int:
    if a.show is not None:
        return await sync_cli.show(conn, a.show, a.json)
    return await sync_cli.request(conn, s, a.device, a.service, a.dry_run, a.json, a.timeout, not a.no_wait)


async def guard(conn: asyncpg.Connection, s: Settings, a: argparse.Namespace) -> int:
    return await guard_cli.run(conn, s, a.cmd, a.site, getattr(a, "json", False))


async def doctor(conn: asyncpg.Connection | None, s: Settings, a: argparse.Namespace) -> int:
    from agent.ops import doctor as checks

    report = await checks.run(s)
    print(report.as_json() if a.json else report.as_text())
    return 0 if report.ok else 1


CONFIG_HELP = (f"TOML settings file (default: ${CONFIG_ENV}, else {DEFAULT_CONFIG} if it exists); "
               "AGENT_* environment variables win")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="agentctl", description=__doc__)
    p.add_argument("--config", default=argparse.SUPPRESS, help=CONFIG_HELP)
    p.add_argument("--version", action="version", version=f"agentctl {__version__}")
    sub = p.add_subparsers(dest="group", required=True)

    db = sub.add_parser("db", help="database set-up").add_subparsers(dest="cmd", required=True)
    ini = db.add_parser("init", help="install PGMQ, migrate schema `agent`, create the site's queue and DLQ and "
                        "record them as the site's (idempotent)")
    ini.add_argument("--site", help="the site whose queue this is (default: AGENT_SITE); commands for its devices "
                     "are sent there")
    ini.add_argument("--queue", type=argtypes.queue_name, help="the site's queue (default: AGENT_QUEUE)")
    ini.add_argument("--print-sql", action="store_true",
                     help="print the SQL instead (for a DBA to apply with psql), connect to nothing")
    ini.add_argument("--after", type=int, default=0, metavar="VERSION",
                     help="with --print-sql: only the migrations after this schema version (see `db status`)")
    ini.set_defaults(func=db_init, needs_db=lambda a: not a.print_sql)
    sts = db.add_parser("status", help="schema version, pending migrations, agent versions served and seen "
                        "(exit 1 when something is pending or this release cannot run)")
    sts.add_argument("--json", action="store_true")
    sts.set_defaults(func=db_status)
    prn = db.add_parser("prune", help="remove what the retention settings no longer keep (AGENT_RETAIN_*)")
    prn.add_argument("--dry-run", action="store_true", help="count what would be removed, remove nothing")
    prn.add_argument("--json", action="store_true")
    prn.set_defaults(func=db_prune)

    dev = sub.add_parser("device", help="device inventory").add_subparsers(dest="cmd", required=True)
    add = dev.add_parser("add", help="add or replace a device")
    add.add_argument("id")
    add.add_argument("--driver", required=True)
    add.add_argument("--address")
    add.add_argument("--site", help="default: AGENT_SITE; a site needs its queue first: agentctl db init --site")
    add.add_argument("--credential", help="name of a credential file on the agent host (not the secret)")
    add.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                     help="driver option; a VALUE that parses as JSON is taken as JSON")
    add.set_defaults(func=device_add)
    ls = dev.add_parser("list", help="list devices of AGENT_SITE")
    ls.add_argument("--json", action="store_true")
    ls.add_argument("--all-sites", action="store_true")
    ls.set_defaults(func=device_list)
    rm = dev.add_parser("remove", help="remove a device and forget its service keys")
    rm.add_argument("id")
    rm.set_defaults(func=device_remove)
    pau = dev.add_parser("pause", help="maintenance: commands for the device wait (parked, no attempts used)")
    pau.add_argument("id")
    pau.add_argument("--reason", default="maintenance", help="shown with its waiting commands")
    pau.set_defaults(func=device_pause)
    res = dev.add_parser("resume", help="end a pause: the device's waiting commands go now")
    res.add_argument("id")
    res.set_defaults(func=device_resume)
    imp = dev.add_parser("import", help="add or replace devices from a TOML or JSON file")
    imp.add_argument("file")
    imp.set_defaults(func=device_import)
    tst = dev.add_parser("test", help="connect, probe and (with --service) read a device; changes nothing "
                         "(exit 1 when a step fails)")
    tst.add_argument("id")
    tst.add_argument("--service", help="also read this service's state")
    tst.add_argument("--json", action="store_true")
    tst.set_defaults(func=devicetest.cli)

    svc = sub.add_parser("service", help="service keys in agent.service_state").add_subparsers(dest="cmd",
                                                                                               required=True)
    sfg = svc.add_parser("forget", help="retire a service key (a churned customer): reconciliation stops "
                         "enforcing it; nothing is sent to the device")
    sfg.add_argument("device")
    sfg.add_argument("service")
    sfg.set_defaults(func=service_forget)

    agt = sub.add_parser("agent", help="agents seen in agent.agents").add_subparsers(dest="cmd", required=True)
    fgt = agt.add_parser("forget", help="remove a stopped or stale agent from the fleet view (a live one is refused)")
    fgt.add_argument("id")
    fgt.set_defaults(func=agent_forget)

    enq = sub.add_parser("enqueue", help="send one command (through agent.enqueue)")
    enq.add_argument("device")
    enq.add_argument("service")
    enq.add_argument("state", choices=["on", "off", "refresh"])
    enq.add_argument("--request-id")
    enq.add_argument("--not-after", type=argtypes.timestamp, help="RFC 3339 time with offset")
    enq.add_argument("--meta", type=argtypes.json_object, help="JSON object kept with the report")
    enq.add_argument("--delay", type=int, default=0, help="seconds before it becomes visible")
    enq.add_argument("--queue", type=argtypes.queue_name,
                     help="send to this queue (default: the queue of the device's site, as for producers)")
    enq.add_argument("--priority", choices=["high", "normal"],
                     help="default: high for a restore (on), normal for the rest")
    enq.add_argument("--batch", help="count it in this batch (agentctl batch show NAME)")
    enq.set_defaults(func=enqueue)

    bat = sub.add_parser("batch", help="batches of commands (agent.enqueue(..., batch => NAME))").add_subparsers(
        dest="cmd", required=True)
    bsh = bat.add_parser("show", help="a batch's commands counted by outcome (pending 0: nothing left to happen "
                         "but what an operator decides for held ones)")
    bsh.add_argument("name")
    bsh.add_argument("--json", action="store_true")
    bsh.set_defaults(func=batch_show)

    dlq = sub.add_parser("dlq", help="dead-letter queue").add_subparsers(dest="cmd", required=True)
    dl = dlq.add_parser("list", help="dead-lettered messages with their reasons")
    dl.add_argument("--json", action="store_true")
    dl.add_argument("--limit", type=int, default=100)
    dl.set_defaults(func=dlq_list)
    rp = dlq.add_parser("replay", help="send DLQ entries back to the queue (original order kept)")
    rp.add_argument("ids", nargs="*", type=int)
    rp.add_argument("--all", action="store_true")
    rp.set_defaults(func=dlq_replay)
    dr = dlq.add_parser("drop", help="let dead letters go: archived, never applied, an event records who and why")
    dr.add_argument("ids", nargs="+", type=int)
    dr.add_argument("--reason", required=True, help="why (kept in the `dropped` event)")
    dr.set_defaults(func=dlq_drop)

    ev = sub.add_parser("events", help="the audit trail: what happened to a request, a device (oldest first)")
    ev.add_argument("--request-id", help="only this request_id (e.g. an invoice's)")
    ev.add_argument("--device", help="only this device")
    ev.add_argument("--since", type=argtypes.since, help="RFC 3339 time, or an age: 30m, 12h, 7d")
    ev.add_argument("--limit", type=int, default=200, help="newest N events at most (default 200)")
    ev.add_argument("--json", action="store_true")
    ev.set_defaults(func=events)

    st = sub.add_parser("state", help="desired and observed state per device and service")
    st.add_argument("--device")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=state)

    stat = sub.add_parser("status", help="what the local agentd is doing (exit 1 when not healthy)")
    stat.add_argument("--json", action="store_true")
    stat.add_argument("--fleet", action="store_true", help="every agent's heartbeat, from the database")
    stat.add_argument("--all-sites", action="store_true", help="with --fleet: not only AGENT_SITE")
    stat.add_argument("--url", help="status URL (default: from AGENT_HTTP_LISTEN)")
    stat.set_defaults(func=status, needs_db=lambda a: a.fleet)

    syn = sub.add_parser("sync", help="reconcile now: read back devices, repair drift, report (exit 1 when drift "
                         "is left or a device cannot be read)")
    syn.add_argument("--device", help="only this device (default: every device of AGENT_SITE)")
    syn.add_argument("--service", help="only this service")
    syn.add_argument("--dry-run", action="store_true", help="show drift, repair nothing")
    syn.add_argument("--json", action="store_true")
    syn.add_argument("--timeout", type=float, default=300, help="seconds to wait for the result (default 300)")
    syn.add_argument("--no-wait", action="store_true", help="print the run id and return")
    syn.add_argument("--show", type=int, metavar="RUN", help="show an earlier run instead")
    syn.set_defaults(func=sync)

    grd = sub.add_parser("guard", help="commands held by the guard against mass suspension").add_subparsers(
        dest="cmd", required=True)
    gst = grd.add_parser("status", help="held commands by device, the oldest, the window's count and limit "
                         "(exit 1 when some are held)")
    gst.add_argument("--json", action="store_true")
    grl = grd.add_parser("release", help="the held commands proceed (each still newest is applied), and the "
                         "limit is lifted for AGENT_GUARD_WINDOW")
    gds = grd.add_parser("discard", help="each held command ends as discarded, never applied")
    for g in (gst, grl, gds):
        g.add_argument("--site", help="default: AGENT_SITE")
        g.set_defaults(func=guard)

    doc = sub.add_parser("doctor", help="check database, queue, tunnel, routes and devices, in order, with fixes "
                         "(exit 1 when any fails)")
    doc.add_argument("--json", action="store_true")
    doc.set_defaults(func=doctor, needs_db=lambda a: False, needs_url=True)

    con = sub.add_parser("contract", help="the message contract").add_subparsers(dest="cmd", required=True)
    con.add_parser("schema", help="print the JSON Schema of contract v1").set_defaults(func=None, offline=True)
    _config_everywhere(p)
    return p


def _config_everywhere(parser: argparse.ArgumentParser) -> None:
    """`--config` is accepted after any subcommand too (`agentctl db init --config x.toml`)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                if "--config" not in child._option_string_actions:
                    child.add_argument("--config", default=argparse.SUPPRESS, help=CONFIG_HELP)
                _config_everywhere(child)


async def _run(args: argparse.Namespace) -> int:
    needs_db = getattr(args, "needs_db", lambda _a: True)(args)
    need_url = needs_db or getattr(args, "needs_url", False)
    settings = load_settings(config_path(getattr(args, "config", None)), need_database=need_url)
    if not needs_db:
        return await args.func(None, settings, args)
    conn = await _connect(settings)
    try:
        return await args.func(conn, settings, args)
    except (asyncpg.UndefinedTableError, asyncpg.InvalidSchemaNameError, asyncpg.UndefinedFunctionError,
            asyncpg.UndefinedColumnError) as exc:
        initialised = await conn.fetchval("SELECT to_regclass('agent.schema_version') IS NOT NULL")
        if 'relation "pgmq.' in str(exc) and initialised:
            raise ConfigError(f"{exc}: no such queue in this database: check AGENT_QUEUE (or --queue); a new site's "
                              "queue is made by `agentctl db init --site S --queue Q`") from None
        # a database never initialised for the agent, or one whose schema is older than this agentctl
        raise ConfigError(f"{exc}: this database has no agent schema, or an older one than agentctl {__version__} "
                          "needs: run `agentctl db init` as the database's owner (`agentctl db status` says which "
                          "version it has)") from None
    finally:
        await conn.close()


async def _connect(settings: Settings) -> asyncpg.Connection:
    try:
        return await asyncpg.connect(settings.database_url, timeout=10,
                                     server_settings={"application_name": "agentctl"})
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError, asyncpg.InternalClientError,
            ValueError, ArithmeticError) as exc:
        if refused := classify_connect_error(exc, settings.database_url):
            raise refused from None
        raise DatabaseUnreachable(f"cannot reach the database ({redact(settings.database_url)}): "
                                  f"{exc or type(exc).__name__}") from None


class DatabaseUnreachable(Exception):
    pass


EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what `head` leaves a C program with
EXIT_NOT_FOUND = exits.NOT_FOUND  # what a command names does not exist, whatever the command


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "offline", False):
            print(json.dumps(json_schema(), indent=2))
            return 0
        return asyncio.run(_run(args))
    except BrokenPipeError:  # `agentctl ... | head`: the reader has gone, which is no error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except NotFoundError as exc:
        print(f"agentctl: {exc}", file=sys.stderr)
        return EXIT_NOT_FOUND
    except AgentError as exc:
        print(f"agentctl: {exc}", file=sys.stderr)
        return 2
    except DatabaseUnreachable as exc:
        print(f"agentctl: {exc}", file=sys.stderr)
        return 1
    except asyncpg.PostgresError as exc:
        print(f"agentctl: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        if exc.filename is not None:  # a file named on the command line, not the database connection
            print(f"agentctl: cannot read {exc.filename}: {exc.strerror or exc}", file=sys.stderr)
            return 2
        print(f"agentctl: database connection lost: {exc or type(exc).__name__}", file=sys.stderr)
        return 1
    except (asyncpg.InterfaceError, TimeoutError, asyncpg.InternalClientError) as exc:
        print(f"agentctl: database connection lost: {exc or type(exc).__name__}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
