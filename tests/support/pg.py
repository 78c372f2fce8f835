"""Throwaway Postgres for tests: a pgserver cluster per session, a fresh database per test.

AGENT_TEST_DSN points the tests at an external server instead (its databases are still
created and dropped per test).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg


class Cluster:
    """A throwaway cluster in a temporary directory; `close()` stops it and removes the directory."""

    def __init__(self) -> None:
        import pgserver

        self.root = Path(tempfile.mkdtemp(prefix="agent-test-pg-"))
        os.chmod(self.root, 0o755)
        self._server = pgserver.get_server(self.root / "data", cleanup_mode="delete")
        self.dsn = self._server.get_uri()

    def close(self) -> None:
        try:
            self._server.cleanup()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def start_cluster() -> tuple[str, Cluster | None]:
    """Return (admin DSN, cluster to close or None for an external server)."""
    external = os.environ.get("AGENT_TEST_DSN")
    if external:
        return external, None
    cluster = Cluster()
    return cluster.dsn, cluster


def with_database(dsn: str, name: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path="/" + name))


async def create_database(admin_dsn: str) -> str:
    name = "t_" + uuid.uuid4().hex[:12]
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return with_database(admin_dsn, name)


async def drop_database(admin_dsn: str, dsn: str) -> None:
    name = urlsplit(dsn).path.lstrip("/")
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()
