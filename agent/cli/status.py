"""`agentctl status`: what the local daemon is doing, or the fleet as the database sees it."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import aiohttp
import asyncpg

from agent.db.identity import STALE_FACTOR
from agent.db.leadership import LEADER_LOCK_CLASS
from agent.db.queries import Queries
from agent.db.retention import table_stats
from agent.settings import Settings
from agent.text import clean, dumps, local_time

QUEUE_CAP = 100_000   # queue depths are counted up to this (as the agents' own status does)


async def local(settings: Settings, as_json: bool, url: str | None) -> int:
    if url is None:
        hp = settings.http_host_port
        if hp is None:
            return _down(as_json, "AGENT_HTTP_LISTEN is empty: the daemon serves no status endpoint")
        host = "127.0.0.1" if hp[0] in ("0.0.0.0", "::", "") else hp[0]
        url = f"http://{host}:{hp[1]}/status"
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
            async with http.get(url) as resp:
                snap = await resp.json()
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        return _down(as_json, f"agentd is not running or not answering at {url} ({exc or type(exc).__name__})")
    if as_json:
        print(json.dumps(snap, indent=2))
    else:
        print(render(snap))
    return 0 if snap.get("healthy") else 1


def _down(as_json: bool, reason: str) -> int:
    if as_json:
        print(json.dumps({"healthy": False, "state": "down", "status": reason}))
    else:
        print(f"down: {reason}")
    return 1


def render(s: dict[str, Any]) -> str:
    lines = [s["status"],
             f"agent     {s['agent_id']} (site {s['site']}, queue {s['queue']}), version {s['version']}, "
             f"up {_dur(s['uptime_s'])}",
             f"database  {'unreachable: ' + s['database_error'] if s['database_error'] else 'ok'}; "
             f"LISTEN {'up' if s['listener_up'] else 'down'}",
             f"queue     {_n(s['queue_depth'])} messages, oldest {_dur(s['queue_oldest_s'])}; "
             f"DLQ {_n(s['dlq_depth'])}; {s['inflight']} in flight"]
    if s.get("leader"):
        lines.append("reconcile leading site " + s["site"] + (f", next run {s['next_reconcile']}"
                                                           if s.get("next_reconcile") else ", no schedule"))
    else:
        lines.append("reconcile standby (another agent leads the site, or none is elected yet)")
    if s.get("peers"):
        lines.append("vpn       " + ", ".join(f"{p['peer']}: {p['state']}" for p in s["peers"]))
    lines.append("recent failures:" + ("" if s["recent_failures"] else " none"))
    for f in s["recent_failures"][-10:]:
        when = local_time(datetime.fromisoformat(f["at"]) if isinstance(f["at"], str) else f["at"], with_date=False)
        lines.append(f"  {when} msg {f['msg_id']} {f['device']}/{f['service']} {f['finish']}: {clean(f['error'])}")
    lines.append("unreachable devices:" + ("" if s["unreachable"] else " none"))
    lines += [f"  {u['device']}: {clean(u['reason'])}" for u in s["unreachable"]]
    if s.get("budgets"):
        lines.append("device budgets:")
        lines += [f"  {budget_line(b)}" for b in s["budgets"]]
    lines.append("drifted (desired != observed):" + ("" if s["drifted"] else " none"))
    lines += [f"  {d['device']}/{d['service']}: desired {d['desired']}, observed {d['observed']}"
              + (" [last command failed: not reconciled until replayed or superseded]" if d.get("failed") else "")
              + (f" ({clean(d['last_error'])})" if d.get("last_error") else "") for d in s["drifted"]]
    return "\n".join(lines)


def budget_line(b: dict[str, Any]) -> str:
    """One device's budget: its rate limit and how often it waited, its breaker if not closed."""
    parts = []
    if b.get("max_rate"):
        parts.append(f"max_rate {b['max_rate']:g}/s, {b['rate_waits']} waits ({b['rate_wait_s']:.1f}s)")
    if b.get("breaker") and b["breaker"] != "closed":
        parts.append(f"breaker {b['breaker'].replace('_', '-')}: {b['timeouts']} timeouts in a row, "
                     f"retry after {b['retry_after']}")
    elif b.get("trips"):
        parts.append(f"breaker closed (opened {b['trips']} times)")
    return f"{clean(b['device'])}: " + ("; ".join(parts) or "no limit")


async def fleet(conn: asyncpg.Connection, settings: Settings, as_json: bool, all_sites: bool) -> int:
    """Every site (or AGENT_SITE's) as the database sees it; exit 1 when an agent is not healthy, none
    has reported, or a site holds devices and no live agent serves it."""
    rows = await conn.fetch(Queries(settings.queue).fleet, None if all_sites else settings.site)
    agents: list[dict[str, Any]] = []
    for r in rows:
        a = {**dict(r), "figures": json.loads(r["figures"])}
        a["stale"] = r["state"] != "stopped" and r["heartbeat_age"] > STALE_FACTOR * settings.heartbeat_interval
        agents.append(a)
    bad = [a for a in agents if not _healthy(a) and a["state"] != "stopped"]
    q = Queries(settings.queue)
    sites = await site_views(conn, q, None if all_sites else settings.site, agents)
    live = {a["site"] for a in agents if not a["stale"] and a["state"] != "stopped"}
    unserved = [v["site"] for v in sites if v["devices"] and v["site"] not in live]
    tables = await table_stats(conn, q)
    if as_json:
        print(dumps({"sites": sites, "agents": agents, "tables": {t: {"bytes": b, "oldest_row_age_s": age}
                                                                  for t, (b, age) in tables.items()}}))
    else:
        print(f"{len(agents)} agent(s), {len(bad)} not healthy" if agents else "no agents have reported")
        for name in unserved:
            print(f"site {clean(name)} has devices and no live agent: its commands wait (start agentd for it)")
        for site in sites:
            print(render_site(site))
        print("agents:" + ("" if agents else " none"))
        for a in agents:
            state = "STALE" if a["stale"] else a["state"]
            print(f"  {a['agent_id']:<28} {a['site']:<10} {state:<9} heartbeat {_dur(float(a['heartbeat_age']))} ago"
                  f"  {a['status'] or ''}")
        print("tables (size, oldest row):")
        for table, (nbytes, age) in tables.items():
            print(f"  {table:<12} {_size(nbytes):>9}  {_dur(age) if age is not None else 'empty'}")
    return 1 if bad or unserved or not agents else 0


def _healthy(a: dict[str, Any]) -> bool:
    return not a["stale"] and a["state"] == "ready"


async def site_views(conn: asyncpg.Connection, q: Queries, site: str | None,
                     agents: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per site: its queue (recorded, else the one its agents report) with depth, oldest age and DLQ
    depth; its leader (from the advisory lock, so only a live leader shows); its agents and their
    health; its unreachable devices."""
    existing = {r["queue_name"] for r in await conn.fetch(q.queue_names)}
    views = []
    for r in await conn.fetch(q.fleet_sites, site, LEADER_LOCK_CLASS):
        mine = [a for a in agents if a["site"] == r["site"]]
        queue = r["queue"] or next((a["queue"] for a in mine if a["state"] != "stopped"), None)
        stats, hidden = None, False
        if queue is not None and {queue, f"{queue}_dlq"} <= existing:
            try:
                stats = await conn.fetchrow(Queries(queue).queue_stats, QUEUE_CAP)
            except asyncpg.InsufficientPrivilegeError:  # another site's queue, seen from a site's worker role
                hidden = True
        views.append({
            "site": r["site"], "queue": queue, "queue_recorded": r["queue"] is not None,
            "queue_missing": queue is not None and stats is None and not hidden, "queue_hidden": hidden,
            "queue_depth": stats["depth"] if stats else None,
            "queue_oldest_s": _float(stats["oldest"]) if stats else None,
            "dlq_depth": stats["dlq_depth"] if stats else None,
            "guard_held": stats["held"] if stats else None,
            "leader": _agent_of(r["leader_backend"]),
            "agents": [a["agent_id"] for a in mine], "healthy_agents": sum(_healthy(a) for a in mine),
            "devices": r["devices"],
            "unreachable": json.loads(r["unreachable"])})
    return views


def _agent_of(application_name: str | None) -> str | None:
    """The agent id in a session's application_name ("agentd <role> <agent id>")."""
    if application_name is None:
        return None
    parts = application_name.split(" ", 2)
    return parts[2] if len(parts) == 3 and parts[0] == "agentd" else application_name


def _float(v: Any) -> float | None:
    return None if v is None else round(float(v), 1)


def render_site(v: dict[str, Any]) -> str:
    if v["queue"] is None:
        queue = "no queue recorded (agentctl db init --site ...)"
    elif v["queue_missing"]:
        queue = f"queue {v['queue']} MISSING (agentctl db init --site {v['site']} --queue {v['queue']})"
    elif v.get("queue_hidden"):
        queue = f"queue {v['queue']} (not readable by this login: another site's)"
    else:
        queue = (f"queue {v['queue']}{'' if v['queue_recorded'] else ' (not recorded)'}: {v['queue_depth']} "
                 f"messages, oldest {_dur(v['queue_oldest_s'])}; DLQ {v['dlq_depth']}"
                 + (f"; {v['guard_held']} HELD by the guard (agentctl guard status --site {clean(v['site'])})"
                    if v.get("guard_held") else ""))
    lines = [f"site {clean(v['site'])}: {queue}",
             f"  leader {clean(v['leader']) if v['leader'] else 'none'}; agents {v['healthy_agents']} healthy of "
             f"{len(v['agents'])}" + (f" ({', '.join(clean(a) for a in v['agents'])})" if v["agents"] else ""),
             "  unreachable devices:" + ("" if v["unreachable"] else " none")]
    lines += [f"    {clean(u['device'])}: {clean(u['reason'] or 'unreachable')}" for u in v["unreachable"]]
    return "\n".join(lines)


def _size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n} B"


def _n(v: Any) -> str:
    return "?" if v is None else str(v)


def _dur(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"
