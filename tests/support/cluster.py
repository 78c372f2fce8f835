"""Cluster-level test helpers: a private Postgres cluster a test may crash, and LOGIN roles.

`CrashableCluster` is for tests that stop Postgres (the session cluster is shared and must stay
up): the pgserver wheel's own binaries, a private Unix socket directory and no TCP at all.
Roles are cluster-wide, so `login_role` makes a uniquely named one and drops it afterwards.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

_SYSTEM_USER = "pgserver"  # as root, Postgres runs as pgserver's own unprivileged user


def _bin(name: str) -> str:
    import pgserver

    return str(Path(pgserver.__file__).parent / "pginstall" / "bin" / name)


class CrashableCluster:
    """initdb'ed in a temporary directory, reachable only on its own Unix socket."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="agent-crash-pg-"))
        self.data = self.root / "data"
        self.socket_dir = self.root  # short path: Unix socket names are limited to ~107 bytes
        self.log = self.root / "postgres.log"
        self._user: str | None = None
        if os.geteuid() == 0:
            from pgserver.utils import ensure_prefix_permissions, ensure_user_exists

            entry = ensure_user_exists(_SYSTEM_USER)
            assert entry is not None
            self._user = _SYSTEM_USER
            ensure_prefix_permissions(self.root)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        os.chmod(self.root, 0o755)
        self._run(_bin("initdb"), "-D", str(self.data), "--auth=trust", "--encoding=utf8", "-U", "postgres")
        self.dsn = f"postgresql://postgres@/postgres?host={self.socket_dir}"
        self.start()

    def _run(self, *args: str) -> None:
        proc = subprocess.run(args, user=self._user, capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            log = self.log.read_text() if self.log.exists() else ""
            raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr}\n{log}")

    def start(self) -> None:
        """Start and wait until it accepts connections (after a crash: until recovery is done)."""
        self._run(_bin("pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60",
                  "-o", f"-h '' -k {self.socket_dir}", "start")

    def stop(self, mode: str = "fast") -> None:
        """`immediate` is a crash as far as the data is concerned: recovery runs at the next start."""
        self._run(_bin("pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def running(self) -> bool:
        return subprocess.run([_bin("pg_ctl"), "-D", str(self.data), "status"], user=self._user,
                              capture_output=True).returncode == 0

    def close(self) -> None:
        try:
            if self.running():
                self.stop("immediate")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def as_user(dsn: str, user: str) -> str:
    """The same server and database, logged in as `user` (the test clusters trust local logins)."""
    parts = urlsplit(dsn)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}@{host}"))


@asynccontextmanager
async def login_role(admin_dsn: str, *groups: str) -> AsyncIterator[str]:
    """A LOGIN role, unique to the caller, member of `groups`; dropped afterwards."""
    name = f"t_login_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(admin_dsn)
    try:
        await admin.execute(f'CREATE ROLE "{name}" LOGIN')
        for group in groups:
            await admin.execute(f'GRANT "{group}" TO "{name}"')
        yield name
    finally:
        try:  # its memberships go with it
            await admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1", name)
            await admin.execute(f'DROP OWNED BY "{name}"')
            await admin.execute(f'DROP ROLE "{name}"')
        finally:
            await admin.close()


@asynccontextmanager
async def connected_as(admin_dsn: str, *groups: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection of a fresh LOGIN role, member of `groups` (a producer, a worker, a site's role)."""
    async with login_role(admin_dsn, *groups) as name:
        conn = await asyncpg.connect(as_user(admin_dsn, name))
        try:
            yield conn
        finally:
            await conn.close()


@asynccontextmanager
async def listening(admin_dsn: str, conn: asyncpg.Connection, channel: str) -> AsyncIterator[list[dict[str, Any]]]:
    """The JSON payloads NOTIFY delivers on `channel`, to the role of `conn`, on a connection of its own."""
    payloads: list[dict[str, Any]] = []
    listener = await asyncpg.connect(as_user(admin_dsn, await conn.fetchval("SELECT current_user")))
    await listener.add_listener(channel, lambda _c, _p, _ch, payload: payloads.append(json.loads(payload)))
    try:
        yield payloads
    finally:
        await listener.close()


async def not_denied(conn: asyncpg.Connection, statements: list[str]) -> list[str]:
    """The statements that did not fail with insufficient_privilege (a missing grant, or a row-level
    security policy the new row violates), with what happened instead."""
    allowed = []
    for sql in statements:
        try:
            await conn.execute(sql)
        except asyncpg.InsufficientPrivilegeError:
            continue
        except asyncpg.PostgresError as exc:
            allowed.append(f"{sql}  -> {type(exc).__name__}: {exc}")
        else:
            allowed.append(f"{sql}  -> succeeded")
    return allowed
