"""Helpers shared by the benches that need more than bench/pipeline.py's throwaway Postgres: a private
cluster with settings that need a restart (max_connections), counting statements per role in the
server log, and the memory Postgres backends hold of their own.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

LOG_PREFIX = "%m [%p] user=%u app=%a "
STATEMENT = re.compile(r"user=(\S*) app=(.*?) LOG:  (?:statement|execute [^:]*): (.*)$", re.M)


@dataclass
class Cluster:
    """A pgserver cluster of this bench's own (its data directory is deleted by close())."""

    root: Path
    server: Any
    dsn: str

    @property
    def data(self) -> Path:
        return self.root / "pg"

    @property
    def log(self) -> Path:
        return self.data / "log"

    def close(self) -> None:
        self.server.cleanup()
        shutil.rmtree(self.root, ignore_errors=True)


async def private_cluster(prefix: str, conf: dict[str, str]) -> Cluster:
    """initdb and start (pgserver), ALTER SYSTEM each setting, then restart so that settings such as
    max_connections take effect (pgserver starts the cluster again from the same data directory)."""
    import os

    import pgserver

    root = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(root, 0o755)
    server = pgserver.get_server(root / "pg", cleanup_mode="stop")
    conn = await asyncpg.connect(server.get_uri())
    for key, value in conf.items():
        await conn.execute(f"ALTER SYSTEM SET {key} = '{value}'")
    await conn.close()
    server.cleanup()  # the last handle: pg_ctl stop
    server = pgserver.get_server(root / "pg", cleanup_mode="delete")
    return Cluster(root, server, server.get_uri())


def with_user(dsn: str, user: str) -> str:
    """The same server and database, logged in as `user` (pgserver trusts local logins)."""
    scheme, _, rest = dsn.partition("://")
    return f"{scheme}://{user}@{rest.rpartition('@')[2]}"


def with_database(dsn: str, name: str) -> str:
    return dsn.replace("/postgres?", f"/{name}?")


@dataclass
class StatementLog:
    """log_statement=all on a cluster whose log file we can read; counts statements by role and by text."""

    admin_dsn: str
    log: Path
    start: int = 0
    by_user: Counter[str] = field(default_factory=Counter)
    by_text: Counter[str] = field(default_factory=Counter)
    by_app: Counter[str] = field(default_factory=Counter)

    async def _set(self, on: bool) -> None:
        conn = await asyncpg.connect(self.admin_dsn)
        if on:
            await conn.execute("ALTER SYSTEM SET log_statement = 'all'")
            await conn.execute(f"ALTER SYSTEM SET log_line_prefix = '{LOG_PREFIX}'")
        else:
            await conn.execute("ALTER SYSTEM RESET log_statement")
            await conn.execute("ALTER SYSTEM RESET log_line_prefix")
        await conn.execute("SELECT pg_reload_conf()")
        await conn.close()

    async def begin(self) -> None:
        await self._set(True)
        self.start = self.log.stat().st_size

    async def end(self, keep: Any = None) -> None:
        """Stop logging and count the window's statements of the roles `keep` accepts."""
        size = self.log.stat().st_size
        await self._set(False)
        with self.log.open(errors="replace") as f:
            f.seek(self.start)
            window = f.read(size - self.start)
        for user, app, text in STATEMENT.findall(window):
            if keep is None or keep(user):
                self.by_user[user] += 1
                self.by_app[app] += 1
                self.by_text[" ".join(text.split())[:70]] += 1


async def has_pg_stat_statements(conn: asyncpg.Connection) -> bool:
    """Loaded at server start (shared_preload_libraries) and installable in this database."""
    preload = await conn.fetchval("SELECT current_setting('shared_preload_libraries')")
    if "pg_stat_statements" not in preload:
        return False
    await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
    return True


async def statement_calls(conn: asyncpg.Connection) -> Counter[str]:
    """pg_stat_statements calls so far in this database, by role."""
    rows = await conn.fetch("""SELECT r.rolname, sum(s.calls)::bigint AS calls FROM pg_stat_statements s
                               JOIN pg_roles r ON r.oid = s.userid
                               WHERE s.dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
                               GROUP BY 1""")
    return Counter({r["rolname"]: r["calls"] for r in rows})


def private_kb(pid: int) -> int:
    """Memory a process holds of its own (Private_Clean + Private_Dirty, kB): for a Postgres backend,
    what it costs beyond the shared buffers every backend maps."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0
    return sum(int(m) for m in re.findall(r"^Private_(?:Clean|Dirty):\s+(\d+) kB", text, re.M))
