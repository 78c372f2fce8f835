"""Operator actions on the database, shared by agentctl, the demo and the tests."""

from __future__ import annotations

import getpass
import json
import os
import re
import socket
import tomllib
from pathlib import Path
from typing import Any

import asyncpg

from agent.contract import DEVICE_PATTERN
from agent.db.queries import Queries
from agent.drivers.base import DriverContext
from agent.drivers.registry import load_driver
from agent.errors import AgentError, ConfigError, NotFoundError, PermanentError
from agent.inventory.cache import validate_with
from agent.model.device import Device
from agent.text import clean

_DEVICE_RE = re.compile(DEVICE_PATTERN)


def parse_option(text: str) -> tuple[str, Any]:
    """KEY=VALUE; a VALUE that parses as JSON is taken as JSON, anything else as a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"option {text!r} is not KEY=VALUE")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def validate_device(dev: Device) -> None:
    if not _DEVICE_RE.match(dev.id):
        raise ConfigError(f"device id {dev.id!r} must match {DEVICE_PATTERN}")
    driver = load_driver(dev.driver, DriverContext())
    validate_with(driver, dev)


def device_from_doc(doc: dict[str, Any], default_site: str) -> Device:
    allowed = {"id", "driver", "address", "site", "options", "credential"}
    if not isinstance(doc, dict) or "id" not in doc or "driver" not in doc:
        raise ConfigError(f"a device needs at least id and driver: {doc!r}")
    if extra := set(doc) - allowed:
        raise ConfigError(f"device {doc['id']!r}: unknown field(s) {', '.join(sorted(extra))}")
    options = doc.get("options") or {}
    if not isinstance(options, dict):
        raise ConfigError(f"device {doc['id']!r}: options must be a table/object")
    return Device(id=str(doc["id"]), driver=str(doc["driver"]), address=doc.get("address"),
                  site=str(doc.get("site") or default_site), options=options, credential=doc.get("credential"))


def read_device_file(path: Path, default_site: str) -> list[Device]:
    """TOML (`[[device]]` tables) or JSON (a list, or {"devices": [...]})."""
    text = path.read_text()
    try:
        doc: Any = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
    if isinstance(doc, dict):
        doc = doc.get("device", doc.get("devices"))
    if not isinstance(doc, list):
        raise ConfigError(f"{path}: expected a list of devices ([[device]] in TOML)")
    return [device_from_doc(d, default_site) for d in doc]


async def upsert_devices(conn: asyncpg.Connection, devices: list[Device]) -> None:
    for dev in devices:
        validate_device(dev)
    async with conn.transaction():
        for dev in devices:
            await conn.execute(
                """INSERT INTO agent.devices (id, driver, address, site, options, credential)
                   VALUES ($1, $2, $3, $4, $5::jsonb, $6)
                   ON CONFLICT (id) DO UPDATE SET driver = EXCLUDED.driver, address = EXCLUDED.address,
                     site = EXCLUDED.site, options = EXCLUDED.options, credential = EXCLUDED.credential,
                     updated_at = now()""",
                dev.id, dev.driver, dev.address, dev.site, json.dumps(dev.options), dev.credential)


async def check_sites(conn: asyncpg.Connection, q: Queries, sites: set[str]) -> None:
    """Refuse devices of a site with no queue recorded: their commands would have nowhere to go but
    the default queue, whose agents serve another site. The remedy is named."""
    try:
        missing = [r["name"] for r in await conn.fetch(q.unrecorded_sites, sorted(sites))]
    except asyncpg.UndefinedTableError:  # a database before schema 7 records no sites
        return
    if missing:
        names = ", ".join(repr(m) for m in missing)
        raise ConfigError(f"site {names} has no queue recorded: run `agentctl db init --site {missing[0]} "
                          "--queue <name>` first (the site's agents consume that queue), then add the device"
                          if len(missing) == 1 else
                          f"sites {names} have no queue recorded: run `agentctl db init --site <site> "
                          "--queue <name>` for each first, then import again")


async def list_devices(conn: asyncpg.Connection, site: str | None = None) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        "SELECT id, driver, address, site, options::text AS options, credential,"
        " CASE WHEN paused_at IS NOT NULL THEN coalesce(paused_reason, 'maintenance') END AS paused"
        " FROM agent.devices WHERE $1::text IS NULL OR site = $1 ORDER BY id", site)
    return [{**dict(r), "options": json.loads(r["options"])} for r in rows]


async def pause_device(conn: asyncpg.Connection, q: Queries, device_id: str, reason: str) -> bool:
    """Commands for the device wait (parked, no attempts used) until it is resumed."""
    return bool(await conn.fetchval(q.pause_device, device_id, reason))


async def resume_device(conn: asyncpg.Connection, q: Queries, device_id: str) -> bool:
    return bool(await conn.fetchval(q.resume_device, device_id))


def operator(tool: str = "agentctl") -> str:
    """Who acts, as recorded after the login role in events: the tool, the OS user and the host."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (a container's arbitrary uid)
        user = f"uid {os.getuid()}"
    return clean(f"{tool} {user}@{socket.gethostname()}", 200)


async def remove_device(conn: asyncpg.Connection, q: Queries, device_id: str, by: str) -> tuple[bool, int]:
    """Remove the device and forget its service keys (reconciliation no longer enforces them; an
    event `forgotten` each). (whether the device was there, keys forgotten)."""
    row = await conn.fetchrow(q.remove_device, device_id, by)
    return bool(row["removed"]), int(row["forgotten"])


async def forget_service(conn: asyncpg.Connection, q: Queries, device: str, service: str, by: str) -> None:
    """Retire a service key through agent.forget (the producers' function): NotFoundError when it
    was not known, ConfigError for an id or key that is not valid."""
    try:
        known = await conn.fetchval(q.forget_service, device, service, by)
    except asyncpg.InvalidParameterValueError as exc:
        raise ConfigError(str(exc)) from None
    if not known:
        raise NotFoundError(f"no service {service!r} recorded for device {device!r} (see agentctl state --device "
                            f"{device})")


async def forget_agent(conn: asyncpg.Connection, agent_id: str, stale_after: float) -> None:
    """Remove an agent's row from agent.agents (and the fleet view), unless it is live: not stopped
    and its heartbeat younger than `stale_after` seconds (ConfigError says how long to wait). An
    agent that starts again under the id registers anew."""
    async with conn.transaction():
        row = await conn.fetchrow(
            "SELECT state, extract(epoch FROM now() - last_heartbeat)::float8 AS age FROM agent.agents "
            "WHERE agent_id = $1 FOR UPDATE", agent_id)
        if row is None:
            raise NotFoundError(f"no agent {agent_id!r} in agent.agents (see agentctl status --fleet --all-sites)")
        if row["state"] != "stopped" and row["age"] <= stale_after:
            raise ConfigError(f"agent {agent_id!r} is live (state {row['state']}, heartbeat {row['age']:.0f} s ago): "
                              f"stop it first, or wait until its heartbeat is older than {stale_after:.0f} s")
        await conn.execute("DELETE FROM agent.agents WHERE agent_id = $1", agent_id)


async def enqueue(conn: asyncpg.Connection, queue: str | None, device: str, service: str, state: str | None,
                  **kw: Any) -> int:
    """Through agent.enqueue, so operators get the same validation and routing as producers (queue
    None: the queue of the device's site)."""
    action = "refresh" if state == "refresh" else "set"
    try:
        return await conn.fetchval(
            "SELECT agent.enqueue($1, $2, $3, $4, $5, $6::jsonb, $7, $8, $9, $10, $11)",
            device, service, None if action == "refresh" else state, kw.get("request_id"), kw.get("not_after"),
            json.dumps(kw["meta"]) if kw.get("meta") is not None else None, action, kw.get("delay", 0), queue,
            kw.get("priority"), kw.get("batch"))
    except asyncpg.PostgresError as exc:
        refusal = enqueue_refusal(exc)
        if refusal is None:
            raise
        raise refusal from None


async def batch_status(conn: asyncpg.Connection, name: str) -> dict[str, Any] | None:
    """agent.batch_status(name): the batch's commands counted by outcome; None: no such batch (never
    enqueued, or pruned by retention)."""
    row = await conn.fetchrow("SELECT * FROM agent.batch_status($1)", name)
    return dict(row) if row else None


def enqueue_refusal(exc: asyncpg.PostgresError) -> AgentError | None:
    """What agent.enqueue's SQLSTATE says to do, as our error (pure): 22023 fix the command, P0002
    drop it (unknown device: NotFoundError), 55000 an operator's set-up is missing. None: not a
    refusal of enqueue's."""
    said = str(exc.args[0] if exc.args else exc).removeprefix("agent.enqueue: ")
    hint = getattr(exc, "hint", None)
    if exc.sqlstate == "P0002":  # agentctl exits 4 for it, as for everything named that does not exist
        return NotFoundError(f"{said}: add it first (agentctl device add), or check the id "
                             "(agentctl device list --all-sites)")
    if exc.sqlstate == "55000":
        return ConfigError(said + (f" ({hint})" if hint else ""))
    if exc.sqlstate == "22023":
        return PermanentError(said + (f" ({hint})" if hint else ""))
    return None


def dead_letter_fields(headers: str | None) -> dict[str, Any]:
    """The reason and origin_msg_id of a dead letter, from headers that may be any JSON (pure).

    The agent writes an object; a dead letter of an older release whose message had array headers
    carries the reason appended to the array as an object; anything else carries neither."""
    doc: Any = json.loads(headers) if headers else None
    found: dict[str, Any] = {}
    for part in [doc] if isinstance(doc, dict) else doc if isinstance(doc, list) else []:
        if isinstance(part, dict):
            found.update(part)
    origin = found.get("origin_msg_id")
    reason = found.get("reason")
    return {"reason": reason if isinstance(reason, str) else None,
            "origin_msg_id": origin if isinstance(origin, int) and not isinstance(origin, bool) else None}


_BATCH_NAME = re.compile(r"[A-Za-z0-9._:-]{1,100}")


def enqueue_headers(headers: str | None) -> dict[str, str]:
    """The headers agent.enqueue gave a command, `priority` and `batch`, as a dead letter still
    carries them (pure): a replay keeps them. Values agent.enqueue would refuse are left out."""
    doc: Any = json.loads(headers) if headers else None
    doc = doc if isinstance(doc, dict) else {}
    kept = {}
    if doc.get("priority") in ("high", "normal"):
        kept["priority"] = doc["priority"]
    if isinstance(doc.get("batch"), str) and _BATCH_NAME.fullmatch(doc["batch"]):
        kept["batch"] = doc["batch"]
    return kept


async def dlq_list(conn: asyncpg.Connection, q: Queries, limit: int = 100) -> list[dict[str, Any]]:
    rows = await conn.fetch(q.dlq_list, limit)
    out = []
    for r in rows:
        fields = dead_letter_fields(r["headers"])
        out.append({"dlq_id": r["msg_id"], "enqueued_at": r["enqueued_at"], **fields,
                    "message": json.loads(r["message"]) if r["message"] else None,
                    "headers": json.loads(r["headers"]) if r["headers"] else {}})
    return out


def command_fields(message: str | None) -> dict[str, Any]:
    """device, service and request_id of a dead letter's body, which may be any JSON (pure): each only
    when it is a string of a sane length, else None (a DLQ holds what could not be processed)."""
    try:
        doc: Any = json.loads(message) if message else None
    except ValueError:
        doc = None
    doc = doc if isinstance(doc, dict) else {}
    return {k: v if isinstance(v := doc.get(k), str) and 0 < len(v) <= 200 else None
            for k in ("device", "service", "request_id")}


async def _record(conn: asyncpg.Connection, kind: str, rows: list[dict[str, Any]]) -> None:
    await conn.execute(
        "INSERT INTO agent.events (device, service, kind, msg_id, version, request_id, error, meta) "
        "SELECT x.device, x.service, $2, x.msg_id, x.version, x.request_id, x.error, x.meta "
        "FROM jsonb_to_recordset($1::jsonb) AS x(device text, service text, msg_id bigint, version bigint, "
        "request_id text, error text, meta jsonb)", json.dumps(rows), kind)


async def _who(conn: asyncpg.Connection, by: str) -> str:
    """Who acts, as events record it: the login role, then the tool's label."""
    return str(await conn.fetchval("SELECT session_user || ' (' || $1 || ')'", by))


async def dlq_replay(conn: asyncpg.Connection, q: Queries, ids: list[int] | None,
                     by: str = "agentctl") -> list[tuple[int, int]]:
    """Move DLQ entries back to the queue, keeping each command's original version, and record a
    `replayed` event for each (who, the DLQ entry, the new message id).

    Returns (dlq_id, new msg_id) pairs. The DLQ entry is archived in the same transaction.
    """
    async with conn.transaction():
        if ids is None:
            ids = [r[0] for r in await conn.fetch(q.dlq_ids)]
        rows = await conn.fetch(q.dlq_take, ids)
        who = await _who(conn, by)
        moved, events = [], []
        for r in rows:
            fields = dead_letter_fields(r["headers"])
            keep = {"origin_msg_id": fields["origin_msg_id"], "replayed_from_dlq": r["msg_id"],
                    "previous_reason": fields["reason"], **enqueue_headers(r["headers"])}
            new_id = await conn.fetchval(q.send, q.queue, r["message"], json.dumps(keep))
            moved.append((r["msg_id"], new_id))
            events.append({**command_fields(r["message"]), "msg_id": new_id, "version": fields["origin_msg_id"],
                           "error": f"replayed by {who} from DLQ entry {r['msg_id']} as message {new_id}",
                           "meta": {"by": who, "dlq_id": r["msg_id"], "previous_reason": fields["reason"]}})
        _refuse_missing(ids, [m[0] for m in moved])
        await _record(conn, "replayed", events)
    return moved


async def dlq_drop(conn: asyncpg.Connection, q: Queries, ids: list[int], reason: str,
                   by: str = "agentctl") -> list[int]:
    """Drop dead letters an operator decided to let go: each is moved to the DLQ's archive (pruned
    after AGENT_RETAIN_ARCHIVE_DAYS) and a `dropped` event records who and why. All or nothing:
    NotFoundError when an id is not in the DLQ. Returns the ids dropped."""
    if not reason.strip() or len(reason) > 500:
        raise ConfigError("--reason must say why, in 1 to 500 characters")
    async with conn.transaction():
        rows = await conn.fetch(q.dlq_take, ids)
        _refuse_missing(ids, [r["msg_id"] for r in rows])
        who, why = await _who(conn, by), clean(reason, 500)
        await _record(conn, "dropped", [
            {**command_fields(r["message"]), "msg_id": None,
             "version": dead_letter_fields(r["headers"])["origin_msg_id"],
             "error": f"dropped by {who}: {why}", "meta": {"by": who, "dlq_id": r["msg_id"], "reason": why}}
            for r in rows])
    return [r["msg_id"] for r in rows]


def _refuse_missing(asked: list[int], found: list[int]) -> None:
    if missing := set(asked) - set(found):
        raise NotFoundError(f"no DLQ entries with id {', '.join(map(str, sorted(missing)))} "
                            "(see agentctl dlq list)")


async def states(conn: asyncpg.Connection, device: str | None = None) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        "SELECT device, service, desired, observed, desired_version AS version, desired_failed AS failed,"
        " verified_at, last_error"
        " FROM agent.service_state WHERE $1::text IS NULL OR device = $1 ORDER BY device, service", device)
    return [dict(r) for r in rows]

