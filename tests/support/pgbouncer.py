"""A real PgBouncer (Debian `pgbouncer`) in front of the test Postgres, in transaction mode unless asked
for another `pool_mode`.

It listens on a free loopback port and reaches Postgres on the cluster's Unix socket. As root it
runs as the user who owns that socket's directory, the test cluster's data directory (PgBouncer refuses
to run as root, and the directory is private to its owner): not whichever `postgres` process `ps` lists
first, which may be another cluster's. `dsn(db_dsn)` turns a test database's DSN into
the same database through PgBouncer.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

BINARY = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"


def available() -> bool:
    return Path(BINARY).exists()


def _socket_owner(host: str, port: int) -> str:
    """The user who may open the cluster's Unix socket: the owner of its directory (pgserver's data
    directory), or of the socket itself in a shared directory such as /tmp. Over TCP anyone may."""
    if not host.startswith("/"):
        return "nobody"
    for path in (Path(host), Path(host) / f".s.PGSQL.{port}"):
        with contextlib.suppress(OSError, KeyError):
            if (uid := path.stat().st_uid) != 0:
                return pwd.getpwuid(uid).pw_name
    return "nobody"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PgBouncer:
    def __init__(self, admin_dsn: str, pool_mode: str = "transaction") -> None:
        self.pool_mode = pool_mode
        parts = urlsplit(admin_dsn)
        query = parse_qs(parts.query)
        self.pg_host = query.get("host", [parts.hostname or "127.0.0.1"])[0]
        self.pg_port = parts.port or 5432
        self.user = parts.username or "postgres"
        self.root = Path(tempfile.mkdtemp(prefix="agent-pgbouncer-"))
        os.chmod(self.root, 0o777)
        self.port = _free_port()
        self.log = self.root / "pgbouncer.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> PgBouncer:
        ini = self.root / "pgbouncer.ini"
        ini.write_text(f"""[databases]
* = host={self.pg_host} port={self.pg_port} user={self.user}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {self.port}
unix_socket_dir =
auth_type = any
pool_mode = {self.pool_mode}
max_prepared_statements = 0
default_pool_size = 20
max_client_conn = 500
server_reset_query = {"DISCARD ALL" if self.pool_mode == "session" else ""}
ignore_startup_parameters = extra_float_digits,application_name
logfile = {self.log}
pidfile = {self.root / "pgbouncer.pid"}
""".replace("max_prepared_statements = 0\n", ""))  # 1.18 has no such key; transaction mode keeps none
        user = ["-u", _socket_owner(self.pg_host, self.pg_port)] if os.geteuid() == 0 else []
        self.proc = subprocess.Popen([BINARY, *user, str(ini)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"pgbouncer exited: {self.proc.stderr.read().decode() if self.proc.stderr else ''}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.05)  # a bounded wait for the listener, checked each round
        raise RuntimeError("pgbouncer did not start listening within 10 s")

    def dsn(self, db_dsn: str) -> str:
        database = urlsplit(db_dsn).path.lstrip("/")
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{database}"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        shutil.rmtree(self.root, ignore_errors=True)
