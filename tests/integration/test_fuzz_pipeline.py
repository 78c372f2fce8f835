"""Fuzz the whole parse-and-report path: arbitrary message bodies (whatever jsonb holds: huge numbers,
control characters, deep nesting, big strings) and arbitrary device replies (NaN, NUL, ANSI, huge or
malformed bodies) go through a running agent with real Postgres and PGMQ. Every message ends
archived or dead-lettered with a reason, innocent messages in the same batches are recorded, and
the agent's services stay up."""

from __future__ import annotations

import itertools
import json

import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.agents import running_agent
from tests.support.db import add_device, archived, send
from tests.support.wait import until

_n = itertools.count()

text = st.one_of(st.text(alphabet=st.characters(min_codepoint=1), max_size=50),
                 st.text(alphabet=st.characters(min_codepoint=1, max_codepoint=0x9f)),
                 st.just("\x1b[2J\r\nforged"), st.integers(1, 3).map(lambda n: "big" * 30_000 * n))
keys = st.text(alphabet=st.characters(min_codepoint=1), max_size=8)  # jsonb holds any text but NUL
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False),
                    st.integers(10**300, 10**400).map(lambda n: f"{n}.5"), text)
values = st.recursive(scalars, lambda kids: st.one_of(st.lists(kids, max_size=3),
                                                       st.dictionaries(keys, kids, max_size=3)),
                      max_leaves=20)
replies = st.one_of(values.map(lambda v: json.dumps(v)), st.just('{"on": NaN}'), st.just('{"on": "\\u0000"}'),
                    st.just("\x00\x1b[31m not json"), st.just("[" * 5000), st.just('{"on": true}'))
statuses = st.sampled_from([200, 200, 400, 404, 500, 302])


def body(value: object, meta: object) -> str:
    if isinstance(value, str) and value.endswith(".5") and value[:-2].isdigit():
        return value  # a number too large for a double, as raw JSON
    raw = json.dumps(value)
    return raw if not isinstance(meta, dict) else json.dumps({"device": "h1", "service": "x", "state": "on",
                                                              "meta": meta})


class Replies:
    """The hostile device: for service key k, status and body from the current example's table."""

    def __init__(self) -> None:
        self.table: dict[str, tuple[int, str]] = {}
        app = web.Application()
        app.router.add_route("*", "/s/{service}", self._serve)
        self.app = app

    async def _serve(self, request: web.Request) -> web.Response:
        status, text = self.table.get(request.match_info["service"], (404, "gone"))
        if status == 302:
            return web.Response(status=302, headers={"Location": "http://127.0.0.1:9/elsewhere"})
        return web.Response(status=status, body=text.encode("utf-8", "surrogatepass"),
                            content_type="application/json")


@pytest.fixture
async def hostile(aiohttp_server):
    device = Replies()
    server = await aiohttp_server(device.app)
    return device, server.port


@settings(max_examples=12, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(messages=st.lists(st.tuples(st.one_of(values, scalars), st.one_of(st.none(), values)), max_size=6),
       device_replies=st.lists(st.tuples(statuses, replies), min_size=1, max_size=4))
async def test_every_message_ends_archived_or_dead_lettered_and_innocents_are_recorded(
        db, dsn, tmp_path, hostile, messages, device_replies):
    device, port = hostile
    n = next(_n)
    if n == 0 or not await db.fetchval("SELECT count(*) FROM agent.devices"):
        await add_device(db, "r1", "sim", {"state_file": str(tmp_path / "r1.json")})
        await add_device(db, "h1", "http", {"read_path": "/s/{service}", "state_pointer": "/on",
                                            "set_method": "PUT", "max_reply_bytes": 100_000})
        await db.execute("UPDATE agent.devices SET address = $1 WHERE id = 'h1'", f"127.0.0.1:{port}")
    device.table = {f"k{n}-{i}": reply for i, reply in enumerate(device_replies)}
    # running_agent raises at exit if any of the agent's services died meanwhile
    async with running_agent(dsn, None, max_attempts=2, retry_base=0.01, retry_max=0.02, batch_size=50,
                             require_vpn=False):
        sent = []
        for value, meta in messages:
            sent.append(await db.fetchval("SELECT pgmq.send('device_tasks', $1::jsonb)", body(value, meta)))
        for key in device.table:
            sent.append(await send(db, {"device": "h1", "service": key, "state": "on"}))
        innocent = [await send(db, {"device": "r1", "service": f"i{n}-{i}", "state": "on"}) for i in range(3)]
        await until(lambda: db.fetchval('SELECT count(*) = 0 FROM pgmq."q_device_tasks"'), timeout=30,
                    what="every message settled")
    for msg in innocent:
        assert await archived(db, msg)
    reasons = await db.fetch('SELECT headers->>\'reason\' AS reason FROM pgmq."q_device_tasks_dlq"')
    assert all(r["reason"] for r in reasons)
    settled = await db.fetchval('SELECT count(*) FROM pgmq."a_device_tasks" WHERE msg_id = ANY($1::bigint[])',
                                sent + innocent)
    assert settled == len(sent) + len(innocent)  # DLQ entries are archived from the queue too

