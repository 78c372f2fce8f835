"""`agentctl guard`: the commands the guard against mass suspension holds, and an operator's decision.

`status` shows them by device with the site's count in the window and its limit; `release` lets them
proceed and lifts the limit for one window; `discard` ends each of them, never applied. Both are
audited in agent.events (`released`, `discarded`) with the login role and the OS user who ran them.
"""

from __future__ import annotations

import getpass
import math
import sys
from datetime import datetime
from typing import Any

import asyncpg

from agent.cli import exits
from agent.db.queries import Queries
from agent.settings import Settings
from agent.text import clean, dumps, local_time


async def site_queue(conn: asyncpg.Connection, s: Settings, site: str) -> Queries:
    """The queries of the site's queue: the one agent.sites records, else AGENT_QUEUE for AGENT_SITE."""
    queue = await conn.fetchval("SELECT queue FROM agent.sites WHERE name = $1", site)
    if queue is None and site == s.site:
        queue = s.queue
    if queue is None:
        raise LookupError(f"site {site!r} has no queue recorded (agentctl db init --site)")
    return Queries(queue)


def limit(s: Settings, services_on: int) -> int | None:
    """The number of services the site may turn off within the window (None: no guard)."""
    if s.guard_off_percent >= 100:
        return None
    return max(s.guard_off_min, math.floor(services_on * s.guard_off_percent / 100))


async def status(conn: asyncpg.Connection, s: Settings, site: str, as_json: bool) -> int:
    q = await site_queue(conn, s, site)
    devices = [dict(r) for r in await conn.fetch(q.guard_held)]
    w = dict(await conn.fetchrow(q.guard_window, site, s.guard_window))
    doc: dict[str, Any] = {
        "site": site, "queue": q.queue, "window_s": s.guard_window, "turned_off": w["turned_off"],
        "services_on": w["services_on"], "limit": limit(s, w["services_on"]), "lifted_until": w["lifted_until"],
        "lifted_by": w["lifted_by"], "held": sum(d["held"] for d in devices),
        "oldest_held_since": min((d["held_since"] for d in devices), default=None), "devices": devices}
    if as_json:
        print(dumps(doc))
        return 1 if doc["held"] else 0
    lim = "none (AGENT_GUARD_OFF_PERCENT=100)" if doc["limit"] is None else str(doc["limit"])
    print(f"site {clean(site)}: {doc['turned_off']} service(s) turned off in the last {s.guard_window:g}s; "
          f"limit {lim} (of {doc['services_on']} on)")
    if doc["lifted_until"] is not None:
        print(f"limit lifted until {local_time(doc['lifted_until'])} by {clean(doc['lifted_by'] or '-')}")
    if not devices:
        print("no command held")
        return 0
    print(f"{doc['held']} command(s) held, the oldest since {_when(doc['oldest_held_since'])}:")
    for d in devices:
        note = f" ({d['superseded']} superseded by a newer command)" if d["superseded"] else ""
        print(f"  {clean(d['device'] or '-'):<24} {d['held']:>6} held since {_when(d['held_since'])}{note}")
    print("decide: agentctl guard release (they proceed) or agentctl guard discard (none is applied)")
    return 1


async def release(conn: asyncpg.Connection, s: Settings, site: str) -> int:
    q = await site_queue(conn, s, site)
    row = await conn.fetchrow(q.guard_release, site, s.guard_window, _os_user(), q.channel)
    print(f"released {row['released']} held command(s) of site {clean(site)}; the limit is lifted until "
          f"{local_time(row['lifted_until'])} (by {clean(row['who'])})")
    return 0


async def discard(conn: asyncpg.Connection, s: Settings, site: str) -> int:
    q = await site_queue(conn, s, site)
    row = await conn.fetchrow(q.guard_discard, _os_user(), s.archive)
    print(f"discarded {row['discarded']} held command(s) of site {clean(site)}, none applied (by {clean(row['who'])})")
    return 0


async def run(conn: asyncpg.Connection, s: Settings, action: str, site: str | None, as_json: bool) -> int:
    try:
        if action == "status":
            return await status(conn, s, site or s.site, as_json)
        return await (release if action == "release" else discard)(conn, s, site or s.site)
    except LookupError as exc:  # a site no queue is recorded for: what the command names does not exist
        print(f"agentctl: {exc}", file=sys.stderr)
        return exits.NOT_FOUND


def _when(stamp: str | None) -> str:
    """A held_at header (ISO 8601, written by the agent's report) in the reader's time zone."""
    try:
        return local_time(datetime.fromisoformat(stamp)) if stamp else "-"
    except (TypeError, ValueError):
        return clean(stamp or "-")


def _os_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"
