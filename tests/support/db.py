"""Small SQL helpers for tests: what a producer or an operator would run."""

from __future__ import annotations

import json
from typing import Any

import asyncpg


async def add_device(db: asyncpg.Connection, device_id: str, driver: str = "scripted",
                     options: dict[str, Any] | None = None, site: str = "default") -> None:
    await db.execute("INSERT INTO agent.devices (id, driver, site, options) VALUES ($1, $2, $3, $4::jsonb)",
                     device_id, driver, site, json.dumps(options or {}))


async def send(db: asyncpg.Connection, body: Any, *, raw: bool = False, delay: int = 0,
               queue: str = "device_tasks", headers: dict[str, Any] | None = None) -> int:
    """pgmq.send, as a producer with plain SQL would; `raw` sends a JSON text as it is."""
    text = body if raw else json.dumps(body)
    if headers is not None:
        return await db.fetchval("SELECT pgmq.send($1::text, $2::jsonb, $3::jsonb, $4::integer)", queue, text,
                                 json.dumps(headers), delay)
    return await db.fetchval("SELECT pgmq.send($1::text, $2::jsonb, $3::integer)", queue, text, delay)


async def state(db: asyncpg.Connection, device: str, service: str) -> asyncpg.Record | None:
    return await db.fetchrow("SELECT * FROM agent.service_state WHERE device = $1 AND service = $2",
                             device, service)


async def events(db: asyncpg.Connection, msg_id: int | None = None) -> list[str]:
    rows = await db.fetch("SELECT kind FROM agent.events WHERE $1::bigint IS NULL OR msg_id = $1 ORDER BY id",
                          msg_id)
    return [r["kind"] for r in rows]


async def writes(db: asyncpg.Connection, msg_id: int) -> list[str]:
    """The command's events that record a write its device acknowledged: `applied_at` is set on the
    event that ended the attempt (schema 17); agents before it wrote an `applied` row of its own."""
    rows = await db.fetch("SELECT kind FROM agent.events WHERE msg_id = $1 AND (applied_at IS NOT NULL "
                          "OR kind = 'applied') ORDER BY id", msg_id)
    return [r["kind"] for r in rows]


async def reports_waiting_on_a_lock(db: asyncpg.Connection) -> int:
    """Report statements of this database waiting for a row lock now."""
    return await db.fetchval("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                             "AND datname = current_database() AND query LIKE '%WITH done AS%'")


async def queue_len(db: asyncpg.Connection, queue: str = "device_tasks") -> int:
    return await db.fetchval(f'SELECT count(*) FROM pgmq."q_{queue}"')


async def archived(db: asyncpg.Connection, msg_id: int, queue: str = "device_tasks") -> bool:
    return await db.fetchval(f'SELECT EXISTS (SELECT 1 FROM pgmq."a_{queue}" WHERE msg_id = $1)', msg_id)


async def dlq(db: asyncpg.Connection, queue: str = "device_tasks") -> list[dict[str, Any]]:
    rows = await db.fetch(f'SELECT msg_id, message::text AS message, headers::text AS headers '
                          f'FROM pgmq."q_{queue}_dlq" ORDER BY msg_id')
    return [{"id": r["msg_id"], "message": json.loads(r["message"]), "headers": json.loads(r["headers"] or "{}")}
            for r in rows]
