"""One running process per agent id.

AGENT_AGENT_ID names an agent in events, heartbeats and the fleet view; a config copied to a second
gateway carries the same name. So what holds device claims is the process, an *instance* (a random id
drawn at start), and an agent registers its instance in agent.agents before it works: if a live agent
with the same id runs elsewhere (another host, or another process here), it refuses to start and
names that agent. Live means: not stopped, heartbeat younger than STALE_FACTOR heartbeat intervals,
and, on this host, a process with that pid still there. A restart (the old process gone, or its
heartbeat stale) starts at once.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from dataclasses import dataclass
from typing import Any

import asyncpg

from agent.db import schema as db_schema
from agent.db.queries import Queries
from agent.errors import ConfigError
from agent.text import clean

log = logging.getLogger("agent.db.identity")

STALE_FACTOR = 3  # heartbeat intervals after which an agent that did not say it stopped counts as gone


def new_instance() -> str:
    return uuid.uuid4().hex


def host_identity() -> str:
    """This host, boot and PID namespace: only there does a pid name the same process. The boot id
    tells apart cloned hosts that share a hostname (their first PID namespace has the same inode)."""
    try:
        ns = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        ns = 0
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()[:36]
    except OSError:
        boot = "-"
    return f"{socket.gethostname()}/boot:{boot}/pidns:{ns}"


def alive(pid: int | None) -> bool:
    """Is there a process with this pid here? (A reused pid counts as alive: the lease then runs out.)"""
    if not pid or pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class Holder:
    """The agent.agents row of an agent id: the process last registered under it."""

    host: str
    host_id: str | None
    pid: int | None
    state: str
    heartbeat_age: float
    version: str

    @classmethod
    def from_row(cls, row: Any) -> Holder:
        return cls(row["host"], row["host_id"], row["pid"], row["state"], float(row["heartbeat_age"]),
                   row["version"])


def in_use(agent_id: str, h: Holder | None, host_id: str, pid: int, stale_after: float,
           is_alive: Any = alive) -> str | None:
    """Why `agent_id` may not start here, given its registered holder (pure, with `is_alive`), or
    None: no holder, stopped, stale, or a process of this host that is gone (or this very one)."""
    if h is None or h.state == "stopped" or h.heartbeat_age > stale_after:
        return None
    if h.host_id == host_id and (h.pid == pid or not is_alive(h.pid)):
        return None
    where = "this host" if h.host_id == host_id else f"host {clean(h.host, 200)}"
    return (f"AGENT_AGENT_ID {agent_id!r} is in use by a running agent on {where} (pid {h.pid}, "
            f"{clean(h.version, 40)}, state {clean(h.state, 20)}, heartbeat {h.heartbeat_age:.0f} s ago): give "
            f"each agent its own AGENT_AGENT_ID (two processes with one id would operate one device at once); "
            f"if that agent is gone, this one may start once its heartbeat is older than {stale_after:.0f} s")


async def register(conn: asyncpg.Connection, q: Queries, agent_id: str, instance: str, host_id: str,
                   row: dict[str, Any], stale_after: float, attempts: int = 3) -> None:
    """Record this process as the agent id's holder, unless a live one holds it (ConfigError). The
    row is replaced only as it was read (compare and set on its xmin), so two processes starting
    at once cannot both win; `row`: site, queue, host, pid, version of this agent (its schema version
    is recorded with them)."""
    pid = row["pid"]
    for _ in range(attempts):
        seen = await conn.fetchrow(q.agent_holder, agent_id)
        holder = Holder.from_row(seen) if seen is not None else None
        if problem := in_use(agent_id, holder, host_id, pid, stale_after):
            raise ConfigError(problem)
        won = await conn.fetchval(q.register_agent, agent_id, row["site"], row["queue"], row["host"], pid,
                                  row["version"], instance, host_id, seen["token"] if seen is not None else None,
                                  db_schema.SCHEMA_VERSION)
        if won:
            if holder is not None and holder.state != "stopped":
                log.info("agent id %s taken over from a process that is gone (pid %s, heartbeat %.0f s ago)",
                         agent_id, holder.pid, holder.heartbeat_age, extra={"action": "agent_id_taken_over"})
            return
    raise ConfigError(f"AGENT_AGENT_ID {agent_id!r} is being registered by another process at the same time: "
                      "give each agent its own AGENT_AGENT_ID")
