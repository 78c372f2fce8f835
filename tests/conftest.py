from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest

from agent.db.schema import init_database
from tests.support.agents import kill_leftovers
from tests.support.pg import create_database, drop_database, start_cluster


@pytest.fixture(scope="session")
def pg_admin_dsn():
    dsn, cluster = start_cluster()
    yield dsn
    if cluster is not None:
        cluster.close()


@pytest.fixture(autouse=True)
def _no_leftover_daemons():
    yield
    kill_leftovers()


@pytest.fixture
async def empty_dsn(pg_admin_dsn: str) -> AsyncIterator[str]:
    """A fresh, empty database."""
    dsn = await create_database(pg_admin_dsn)
    yield dsn
    await drop_database(pg_admin_dsn, dsn)


@pytest.fixture
async def dsn(empty_dsn: str) -> str:
    """A fresh database after `agentctl db init`."""
    conn = await asyncpg.connect(empty_dsn)
    try:
        await init_database(conn, "device_tasks")
    finally:
        await conn.close()
    return empty_dsn


@pytest.fixture
async def db(dsn: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(dsn)
    yield conn
    await conn.close()
