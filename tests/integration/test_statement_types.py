"""The daemon's statements bind and return only types asyncpg knows from the start. For any other
(an array of numbers, say) asyncpg asks the server first, on each connection: a catalog query and
its JIT setting changed and restored, three round trips and milliseconds of the server's time. A
pooled connection opens when a burst needs it, so that cost fell in the first second of every
month-end burst, once per connection and type. Numbers travel as text[] (`as_text`) instead."""

from __future__ import annotations

import asyncpg
import pytest

from agent.db.queries import Queries, _blocks

Q = Queries("device_tasks")

# Statements only agentctl runs (one connection, one command: asking once costs nothing there), and
# the DDL `db init` runs (unprepared).
OPERATOR_ONLY = {"dlq_take"}
DDL = {name for name in _blocks() if name.endswith("_index")}


class Asking(asyncpg.Connection):  # type: ignore[misc]
    """A connection that records the types asyncpg had to ask the server about."""

    async def _introspect_types(self, types, timeout):  # type: ignore[no-untyped-def]
        self.__dict__.setdefault("asked_", []).append(set(types))
        return await super()._introspect_types(types, timeout)


def asked(conn: asyncpg.Connection) -> list[set[int]]:
    return conn.__dict__.get("asked_", [])


async def test_the_spy_sees_a_type_asyncpg_has_to_ask_about(dsn):
    conn = await asyncpg.connect(dsn, connection_class=Asking)
    try:
        await conn.prepare("SELECT $1::double precision[]")
        assert asked(conn), "asyncpg's introspection hook moved: this test would check nothing"
    finally:
        await conn.close()


@pytest.mark.parametrize("name", sorted(set(_blocks()) - OPERATOR_ONLY - DDL))
async def test_a_statement_needs_no_type_asked_about_on_a_new_connection(dsn, name):
    conn = await asyncpg.connect(dsn, connection_class=Asking)
    try:
        await conn.prepare(getattr(Q, name))
        assert asked(conn) == [], f"{name}: asyncpg asks the server about type OIDs {asked(conn)}"
    finally:
        await conn.close()
