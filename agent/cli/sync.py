"""`agentctl sync`: ask for an immediate reconcile of a scope, wait for it, and say what was found.

The request goes through the database (agent.request_sync), so this works from any host that can
reach it; the site's leading agent feeds it to the queue and the agents do the work.
Exit status: 0 everything in sync or repaired; 1 drift left (a dry run), unreadable services or a
failed repair; 2 bad request; 3 not finished in time (the run goes on: `agentctl sync --show ID`);
4 no such device, site or run.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
import time
from typing import Any

import asyncpg

from agent.cli import exits
from agent.db.leadership import current_leader
from agent.settings import Settings
from agent.text import clean, dumps

RUN = """SELECT id, site, kind, device, service, dry_run, requested_by, requested_at, finished_at, devices,
                checked, in_sync, drifted, repaired, unreadable, failed
         FROM agent.sync_runs WHERE id = $1"""
ITEMS = """SELECT device, service, expected, found, result, error FROM agent.sync_items
           WHERE run = $1 ORDER BY device, service"""


async def request(conn: asyncpg.Connection, s: Settings, device: str | None, service: str | None,
                  dry_run: bool, as_json: bool, timeout: float, wait: bool) -> int:
    try:
        run = await conn.fetchval("SELECT agent.request_sync($1, $2, $3, $4, 'manual', $5)", s.site, device,
                                  service, dry_run, f"agentctl@{socket.gethostname()}"[:200])
    except (asyncpg.InvalidParameterValueError, asyncpg.InsufficientPrivilegeError,
            asyncpg.ProgramLimitExceededError) as exc:  # agent.request_sync refused the request
        hint = getattr(exc, "hint", None)
        print(f"agentctl: {exc.args[0] if exc.args else exc}" + (f" ({hint})" if hint else ""), file=sys.stderr)
        return exits.NOT_FOUND if exits.names_nothing(exc) else exits.BAD_REQUEST
    if not wait:
        print(run)
        return 0
    if await current_leader(conn, s.site) is None:
        print(f"agentctl: no agent leads site {s.site} right now: run {run} waits until one does",
              file=sys.stderr)
    await _wait(conn, run, timeout)
    return await show(conn, run, as_json)


async def show(conn: asyncpg.Connection, run_id: int, as_json: bool) -> int:
    run = await conn.fetchrow(RUN, run_id)
    if run is None:
        print(f"agentctl: no sync run {run_id}", file=sys.stderr)
        return exits.NOT_FOUND
    items = [dict(r) for r in await conn.fetch(ITEMS, run_id)]
    r = dict(run)
    if as_json:
        print(dumps({**r, "items": items}))
    else:
        print(render(r, items))
    if r["finished_at"] is None:
        print(f"agentctl: run {run_id} has not finished yet; see it later with `agentctl sync --show {run_id}`",
              file=sys.stderr)
        return 3
    left = r["drifted"] - r["repaired"] if r["dry_run"] else r["failed"]
    return 1 if left or r["unreadable"] else 0


def render(r: dict[str, Any], items: list[dict[str, Any]]) -> str:
    """What a person reads. Every text that came from a producer (scope, who asked) or a device (what
    was found, errors) is one escaped line: it can neither forge a line nor drive the terminal."""
    scope = ", ".join(f"{k} {clean(r[k], 200)}" for k in ("device", "service") if r[k]) or \
        f"site {clean(r['site'], 64)}"
    what = "dry run: drift is shown, not repaired" if r["dry_run"] else "drift repaired"
    state = "finished" if r["finished_at"] else "still running"
    by = f", asked by {clean(r['requested_by'], 300)}" if r.get("requested_by") else ""
    lines = [f"sync run {r['id']} ({r['kind']}{by}; {scope}; {what}) {state}: {r['devices']} device(s), "
             f"{r['checked']} service(s) checked: {r['in_sync']} in sync, {r['drifted']} drifted, "
             f"{r['repaired']} repaired, {r['unreadable']} unreadable, {r['failed']} failed"]
    for i in items:
        if i["result"] == "in_sync":
            continue
        device, error = clean(i["device"], 200), clean(i["error"]) if i["error"] else ""
        if i["service"] == "*":  # the device as a whole was not checked (paused, unreachable, removed)
            lines.append(f"  {device}: " + (error if error.startswith("not checked") else f"{i['result']}: {error}"))
            continue
        found = f"expected {clean(i['expected'], 20)}, found {clean(i['found'], 20) if i['found'] else '?'}"
        lines.append(f"  {device}/{clean(i['service'], 200)}: {i['result']} ({found})" + (f": {error}" if error
                                                                                          else ""))
    return "\n".join(lines)


async def _wait(conn: asyncpg.Connection, run: int, timeout: float) -> bool:
    kick = asyncio.Event()
    await conn.add_listener("agent_sync", lambda *_a: kick.set())
    deadline = time.monotonic() + timeout
    while True:
        if await conn.fetchval("SELECT finished_at IS NOT NULL FROM agent.sync_runs WHERE id = $1", run):
            return True
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(min(left, 2.0)):
                await kick.wait()
        kick.clear()
