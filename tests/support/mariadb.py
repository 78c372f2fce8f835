"""A throwaway MariaDB server (Debian `mariadb-server`) for the radius driver's MySQL/MariaDB policy store:
mariadb-install-db into a tmp datadir, mariadbd on a loopback TCP port and a unix socket there, root
over the socket. `database()` makes a database in FreeRADIUS's own MySQL schema (Debian
`freeradius-mysql` reads it through rlm_sql_mysql) and a user of its own, and returns its mysql:// DSN.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pymysql

MARIADBD = Path("/usr/sbin/mariadbd")
INSTALL_DB = Path("/usr/bin/mariadb-install-db")
MYSQL_SCHEMA = Path("/etc/freeradius/3.0/mods-config/sql/main/mysql/schema.sql")
RLM_SQL_MYSQL = Path("/usr/lib/freeradius/rlm_sql_mysql.so")
PACKAGES = "Debian packages mariadb-server and freeradius-mysql"


def mariadb_available() -> str | None:
    """Why the MariaDB-backed radius tests cannot run here, or None."""
    for path in (MARIADBD, INSTALL_DB, MYSQL_SCHEMA, RLM_SQL_MYSQL):
        if not path.is_file():
            return f"{path} not installed ({PACKAGES})"
    return None


def free_tcp_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def schema_statements() -> list[str]:
    """FreeRADIUS's MySQL schema.sql as single statements (it holds no ';' but at their ends)."""
    text = "\n".join(line for line in MYSQL_SCHEMA.read_text().splitlines() if not line.lstrip().startswith("#"))
    return [s.strip() for s in text.split(";") if s.strip()]


class MariaDb:
    """`mariadbd` on 127.0.0.1:`port` and `socket`; `close()` stops it and removes its directory."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="agent-mariadb-"))
        self.socket = str(self.dir / "mysqld.sock")
        self.port = free_tcp_port()
        user = ["--user=root"] if os.geteuid() == 0 else []
        subprocess.run([str(INSTALL_DB), "--no-defaults", f"--datadir={self.dir / 'data'}", "--skip-test-db",
                        "--auth-root-authentication-method=normal", *user],
                       check=True, capture_output=True, timeout=120)
        self._log = self.dir / "error.log"
        self._proc = subprocess.Popen(
            [str(MARIADBD), "--no-defaults", f"--datadir={self.dir / 'data'}", f"--socket={self.socket}",
             f"--port={self.port}", "--bind-address=127.0.0.1", f"--pid-file={self.dir / 'mysqld.pid'}",
             f"--log-error={self._log}", "--skip-log-bin", "--innodb-buffer-pool-size=32M", "--skip-name-resolve",
             *user], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while True:
            try:
                self.root().close()
                break
            except pymysql.MySQLError:
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    tail = self._log.read_text(errors="replace")[-3000:] if self._log.exists() else ""
                    self.close()
                    raise RuntimeError(f"mariadbd did not start (exit {self._proc.returncode}):\n{tail}") from None
                time.sleep(0.1)

    def root(self, database: str | None = None) -> pymysql.connections.Connection:
        return pymysql.connect(unix_socket=self.socket, user="root", password="", database=database,
                               autocommit=True, charset="utf8mb4")

    def database(self, extra: list[str] = ()) -> tuple[str, str, str, str]:
        """A new database in FreeRADIUS's schema (plus `extra` statements) and a user with every right on
        it: (dsn, database, user, password)."""
        name = f"radius_{secrets.token_hex(4)}"
        user, password = f"u_{secrets.token_hex(4)}", f"pw-{secrets.token_hex(6)}"
        conn = self.root()
        try:
            with conn.cursor() as cur:
                cur.execute(f"CREATE DATABASE `{name}`")
                cur.execute("CREATE USER %s@'127.0.0.1' IDENTIFIED BY %s", (user, password))
                cur.execute(f"GRANT ALL ON `{name}`.* TO %s@'127.0.0.1'", (user,))
                cur.execute(f"USE `{name}`")
                for statement in [*schema_statements(), *extra]:
                    cur.execute(statement)
        finally:
            conn.close()
        return f"mysql://{user}:{password}@127.0.0.1:{self.port}/{name}", name, user, password

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(5)
        shutil.rmtree(self.dir, ignore_errors=True)
