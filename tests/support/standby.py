"""A primary and a synchronous streaming standby on loopback TCP, for failover tests.

Both are made from the pgserver wheel's own binaries: `initdb` for the primary, `pg_basebackup -R`
for the standby (it writes `primary_conninfo`, with our application_name, and `standby.signal`).
The primary names the standby in `synchronous_standby_names`, so a commit it acknowledged is on
the standby too: what an agent committed before the primary died survives the promotion.

Every setting is on the postgres command line rather than in postgresql.conf, so the standby does
not inherit the primary's `synchronous_standby_names` (once promoted, it has no standby to wait for).
Authentication is initdb's `trust`, whose pg_hba.conf also lets 127.0.0.1 replicate.
As root, Postgres runs as pgserver's unprivileged user, as `CrashableCluster` does.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import asyncpg

from tests.support.cluster import _SYSTEM_USER, _bin
from tests.support.wait import until

STANDBY_NAME = "failover_standby"  # application_name of the standby's WAL receiver


def available() -> bool:
    """pgserver and its pg_basebackup are installed."""
    try:
        return Path(_bin("pg_basebackup")).is_file()
    except ImportError:
        return False


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Node:
    """One Postgres server of the pair: its data directory, TCP port and log."""

    def __init__(self, root: Path, name: str, user: str | None, settings: dict[str, str]) -> None:
        self.name = name
        self.root = root
        self.data = root / name
        self.log = root / f"{name}.log"
        self.port = _free_port()
        self._user = user
        self._settings = {"listen_addresses": "127.0.0.1", "port": str(self.port), "fsync": "off",
                          "synchronous_commit": "on", "wal_level": "replica", "hot_standby": "on",
                          "log_connections": "on", **settings}

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def run(self, *args: str) -> None:
        proc = subprocess.run(args, user=self._user, capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr}\n{self.log_text()}")

    def start(self) -> None:
        """Start and wait until it accepts connections (a standby: once it is consistent)."""
        options = " ".join(f"-c {k}={v}" for k, v in self._settings.items())
        self.run(_bin("pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60",
                 "-o", f"-k {self.root} {options}", "start")

    def stop(self, mode: str = "fast") -> None:
        """`immediate`: the server dies at once, as when its machine goes away."""
        self.run(_bin("pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def promote(self) -> None:
        """End recovery and accept writes (`pg_ctl promote -w` returns once it does)."""
        self.run(_bin("pg_ctl"), "-D", str(self.data), "-w", "-t", "60", "promote")

    def demote(self) -> None:
        """Start a stopped primary again as a read-only hot standby (following no one), as a cluster
        manager demotes a failed leader: for a while no host of the pair accepts writes."""
        signal_file = self.data / "standby.signal"
        signal_file.touch()
        if self._user is not None:
            shutil.chown(signal_file, self._user, self._user)
        self.start()

    def running(self) -> bool:
        return subprocess.run([_bin("pg_ctl"), "-D", str(self.data), "status"], user=self._user,
                              capture_output=True).returncode == 0

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


class ReplicatedPair:
    """A primary and its synchronous streaming standby; `await start()`, then `close()`."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="agent-failover-pg-"))
        user = None
        if os.geteuid() == 0:
            from pgserver.utils import ensure_prefix_permissions, ensure_user_exists

            entry = ensure_user_exists(_SYSTEM_USER)
            assert entry is not None
            user = _SYSTEM_USER
            ensure_prefix_permissions(self.root)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        os.chmod(self.root, 0o755)
        self.primary = Node(self.root, "primary", user, {"synchronous_standby_names": STANDBY_NAME})
        self.standby = Node(self.root, "standby", user, {})

    async def start(self) -> ReplicatedPair:
        p = self.primary
        p.run(_bin("initdb"), "-D", str(p.data), "--auth=trust", "--encoding=utf8", "-U", "postgres")
        p.start()
        conninfo = f"host=127.0.0.1 port={p.port} user=postgres application_name={STANDBY_NAME}"
        p.run(_bin("pg_basebackup"), "-D", str(self.standby.data), "-d", conninfo, "-R", "-X", "stream",
              "-c", "fast")
        self.standby.start()
        await until(self._synchronous, timeout=30, interval=0.05, what="the standby streaming, synchronous")
        return self

    async def _synchronous(self) -> bool:
        conn = await asyncpg.connect(self.primary.dsn())
        try:
            row = await conn.fetchrow("SELECT state, sync_state FROM pg_stat_replication WHERE application_name = $1",
                                      STANDBY_NAME)
        finally:
            await conn.close()
        return row is not None and (row["state"], row["sync_state"]) == ("streaming", "sync")

    def dsn(self, database: str, first: Node | None = None) -> str:
        """Both hosts in one DSN (`first` listed first); asyncpg picks the one that accepts writes."""
        nodes = [self.primary, self.standby]
        if first is self.standby:
            nodes.reverse()
        hosts = ",".join(f"127.0.0.1:{n.port}" for n in nodes)
        return f"postgresql://postgres@{hosts}/{database}?target_session_attrs=read-write"

    def close(self) -> None:
        try:
            for node in (self.standby, self.primary):
                try:
                    if node.data.exists() and node.running():
                        node.stop("immediate")
                except RuntimeError:
                    pass  # already gone: the directory goes anyway
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
