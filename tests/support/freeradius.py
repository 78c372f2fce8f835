"""A real FreeRADIUS 3.2 (Debian `freeradius`, `freeradius-postgresql`, `freeradius-utils`) for the radius
driver's tests: one process per test module, its throwaway raddb directory under tmp, loopback ports.

It plays both sides the driver meets (freeradius.conf.in): the AAA server whose rlm_sql reads the test
database in FreeRADIUS's own schema (so `access()` asks FreeRADIUS itself whether a subscriber gets in),
and the NAS's Dynamic Authorization Server, which logs what it received (`das_requests()`) and ACKs the
users listed in `nas_sessions` (as a NAS with a live session would) and NAKs 503 the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import asyncpg
from pyrad.packet import AccessAccept, AccessRequest, AccountingRequest, AcctPacket, AuthPacket

from agent.drivers.radius_das import dictionary
from tests.support.wait import until

FREERADIUS = "/usr/sbin/freeradius"
SCHEMA = Path("/etc/freeradius/3.0/mods-config/sql/main/postgresql/schema.sql")
RLM_SQL_POSTGRESQL = Path("/usr/lib/freeradius/rlm_sql_postgresql.so")
TEMPLATE = Path(__file__).with_name("freeradius.conf.in")
NAS_IP = "127.0.0.1"

# The test store: FreeRADIUS's schema, a suspended group that rejects, a normal plan, and the NAS's live
# sessions (what the NAS side knows; the radacct rows are what accounting made of them).
STORE = """
CREATE TABLE nas_sessions (username text NOT NULL, acctsessionid text NOT NULL);
CREATE TABLE nas_lost_stop (username text NOT NULL);  -- the NAS's Accounting-Stop for them never arrives
INSERT INTO radgroupcheck (groupname, attribute, op, value) VALUES ('suspended', 'Auth-Type', ':=', 'Reject');
INSERT INTO radgroupreply (groupname, attribute, op, value) VALUES ('plan', 'Framed-Pool', ':=', 'main');
"""


def freeradius_available() -> str | None:
    """Why the FreeRADIUS tests cannot run here, or None."""
    if not Path(FREERADIUS).is_file():
        return f"{FREERADIUS} not installed (Debian packages freeradius, freeradius-postgresql, freeradius-utils)"
    if not RLM_SQL_POSTGRESQL.is_file():
        return f"{RLM_SQL_POSTGRESQL} not installed (Debian package freeradius-postgresql)"
    if not SCHEMA.is_file():
        return f"{SCHEMA} not installed (Debian package freeradius)"
    return None


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def tcp_black_hole(port: int) -> Iterator[None]:
    """Loopback TCP `port` made silent: a listener with a full accept queue, so a SYN to it is dropped
    (no SYN-ACK, no RST), as from a host that does not answer at all."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", port))
    listener.listen(0)
    fillers = []
    try:
        for _ in range(3):  # backlog 0 holds one; the others wait in SYN-SENT
            sock = socket.socket()
            sock.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                sock.connect(("127.0.0.1", port))
            fillers.append(sock)
        yield
    finally:
        for sock in fillers:
            sock.close()
        listener.close()


@contextlib.contextmanager
def tcp_listener(port: int) -> Iterator[Callable[[], int]]:
    """A loopback TCP listener on `port`; yields a count of the connections it got so far."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", port))
    listener.listen(8)
    listener.setblocking(False)
    got = 0

    def accepted() -> int:
        nonlocal got
        while True:
            try:
                conn, _ = listener.accept()
            except BlockingIOError:
                return got
            conn.close()
            got += 1

    try:
        yield accepted
    finally:
        listener.close()


def conninfo(dsn: str) -> str:
    """A libpq conninfo string for rlm_sql from a postgresql:// URI (a socket directory in ?host= too)."""
    parts = urlsplit(dsn)
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    fields = {"host": query.get("host") or parts.hostname or "", "port": str(parts.port or query.get("port") or ""),
              "dbname": unquote(parts.path.lstrip("/")), "user": unquote(parts.username or ""),
              "password": unquote(parts.password or "")}
    return " ".join(f"{k}={v}" for k, v in fields.items() if v)


async def create_store(dsn: str) -> None:
    """FreeRADIUS's own PostgreSQL schema and the test's groups, in the (empty) database at `dsn`."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(SCHEMA.read_text())
        await conn.execute(STORE)
    finally:
        await conn.close()


async def add_user(dsn: str, name: str, password: str, group: str = "plan", priority: int = 1) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("INSERT INTO radcheck (username, attribute, op, value) "
                           "VALUES ($1, 'Cleartext-Password', ':=', $2)", name, password)
        await conn.execute("INSERT INTO radusergroup (username, groupname, priority) VALUES ($1, $2, $3)",
                           name, group, priority)
    finally:
        await conn.close()


async def add_users(dsn: str, names: list[str], password: str, suspended: set[str] = frozenset()) -> None:
    """Many subscribers in the plan at once; those in `suspended` also in the suspended group, sorting first."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.executemany("INSERT INTO radcheck (username, attribute, op, value) "
                               "VALUES ($1, 'Cleartext-Password', ':=', $2)", [(n, password) for n in names])
        await conn.executemany("INSERT INTO radusergroup (username, groupname, priority) VALUES ($1, $2, $3)",
                               [(n, "plan", 1) for n in names] + [(n, "suspended", 0) for n in suspended])
    finally:
        await conn.close()


@dataclass(frozen=True)
class DasRequest:
    kind: str                     # Disconnect-Request or CoA-Request
    attributes: dict[str, str]    # as FreeRADIUS decoded them (quotes removed)


def parse_pairs(text: str) -> dict[str, str]:
    """FreeRADIUS's %{pairs:request:}: `Name = value, Name = 'text', ...` (values here hold no ', ')."""
    out: dict[str, str] = {}
    for item in text.split(", "):
        name, _, value = item.partition(" = ")
        if name:
            out[name.strip()] = value.strip().strip("'\"")
    return out


PG_CONNECTION = """\
		driver = "rlm_sql_postgresql"
		dialect = "postgresql"
		postgresql {
			send_application_name = yes
		}
		radius_db = "@CONNINFO@"
"""
MYSQL_CONNECTION = """\
		driver = "rlm_sql_mysql"
		dialect = "mysql"
		server = "@HOST@"
		port = @PORT@
		login = "@USER@"
		password = "@PASSWORD@"
		radius_db = "@DATABASE@"
		mysql {
			warnings = auto
		}
"""
# The NAS side's tables in MariaDB (STORE's, with MySQL's types).
MYSQL_STORE = [
    "CREATE TABLE nas_sessions (username varchar(64) NOT NULL, acctsessionid varchar(64) NOT NULL)",
    "CREATE TABLE nas_lost_stop (username varchar(64) NOT NULL)",
    "INSERT INTO radgroupcheck (groupname, attribute, op, value) VALUES ('suspended', 'Auth-Type', ':=', 'Reject')",
    "INSERT INTO radgroupreply (groupname, attribute, op, value) VALUES ('plan', 'Framed-Pool', ':=', 'main')",
]


def sql_connection(dsn: str) -> tuple[str, str]:
    """rlm_sql's connection settings for the store at `dsn`, and its dialect (the queries.conf it reads)."""
    if not dsn.startswith("mysql://"):
        return PG_CONNECTION.replace("@CONNINFO@", conninfo(dsn)), "postgresql"
    parts = urlsplit(dsn)
    fields = {"HOST": parts.hostname or "", "PORT": str(parts.port or 3306), "USER": unquote(parts.username or ""),
              "PASSWORD": unquote(parts.password or ""), "DATABASE": unquote(parts.path.lstrip("/"))}
    text = MYSQL_CONNECTION
    for key, value in fields.items():
        text = text.replace(f"@{key}@", value)
    return text, "mysql"


class FreeRadius:
    """`freeradius -X` with the throwaway configuration; `close()` stops it and removes its directory. The
    store is PostgreSQL, or MariaDB (rlm_sql_mysql) for a mysql:// DSN."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.aaa_secret = "aaa-" + secrets.token_hex(8)
        self.das_secret = "das-" + secrets.token_hex(8)
        self.auth_port, self.acct_port, self.das_port = free_udp_port(), free_udp_port(), free_udp_port()
        self.das_address = f"127.0.0.1:{self.das_port}"
        self.dir = Path(tempfile.mkdtemp(prefix="agent-freeradius-"))
        for sub in ("log", "run"):
            (self.dir / sub).mkdir()
        connection, dialect = sql_connection(dsn)
        text = TEMPLATE.read_text().replace("@SQL_CONNECTION@", connection).replace("@SQL_DIALECT@", dialect)
        for key, value in {"DIR": str(self.dir), "AAA_SECRET": self.aaa_secret, "DAS_SECRET": self.das_secret,
                           "AUTH_PORT": str(self.auth_port), "ACCT_PORT": str(self.acct_port),
                           "DAS_PORT": str(self.das_port)}.items():
            text = text.replace(f"@{key}@", value)
        (self.dir / "radiusd.conf").write_text(text)
        os.chmod(self.dir / "radiusd.conf", 0o600)
        self._out = open(self.dir / "log" / "stdout.log", "wb")  # closed in close()
        self._proc = subprocess.Popen([FREERADIUS, "-X", "-d", str(self.dir), "-n", "radiusd"],
                                      stdout=self._out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while "Ready to process requests" not in self.log():
            if self._proc.poll() is not None or time.monotonic() > deadline:
                tail = self.log()[-3000:]
                self.close()
                raise RuntimeError(f"freeradius did not start (exit {self._proc.returncode}):\n{tail}")
            time.sleep(0.05)

    def log(self) -> str:
        return (self.dir / "log" / "stdout.log").read_text(errors="replace")

    def das_requests(self) -> list[DasRequest]:
        path = self.dir / "log" / "das.log"
        if not path.exists():
            return []
        out = []
        for line in path.read_text().splitlines():
            kind, _, pairs = line.partition("|")
            out.append(DasRequest(kind, parse_pairs(pairs)))
        return out

    async def access(self, user: str, password: str) -> str:
        """Ask FreeRADIUS itself (Access-Request, PAP): "accept" or "reject"."""
        packet = AuthPacket(code=AccessRequest, secret=self.aaa_secret.encode(), dict=dictionary())
        packet.add_message_authenticator()
        packet["User-Name"] = user
        packet["User-Password"] = packet.PwCrypt(password)
        packet["NAS-IP-Address"] = NAS_IP
        reply = await asyncio.to_thread(self._send, packet, self.auth_port)
        return "accept" if reply == AccessAccept else "reject"

    async def start_session(self, user: str, session_id: str, framed_ip: str) -> None:
        """A live session on the NAS (nas_sessions) and its Accounting-Start, as the NAS would send it;
        returns when rlm_sql has made the radacct row."""
        await self.store_execute("INSERT INTO nas_sessions VALUES ({}, {})", user, session_id)
        packet = AcctPacket(code=AccountingRequest, secret=self.aaa_secret.encode(), dict=dictionary())
        for name, value in (("User-Name", user), ("Acct-Session-Id", session_id), ("Acct-Status-Type", "Start"),
                            ("NAS-IP-Address", NAS_IP), ("Framed-IP-Address", framed_ip),
                            ("NAS-Port-Type", "Ethernet"), ("Acct-Authentic", "RADIUS")):
            packet[name] = value
        await asyncio.to_thread(self._send, packet, self.acct_port)

        async def made() -> bool:
            rows = await self.store_fetch("SELECT count(*) FROM radacct WHERE acctsessionid = {}", session_id)
            return bool(rows[0][0])

        await until(made, what=f"radacct row of session {session_id}")

    async def store_fetch(self, query: str, *args: object) -> list[tuple[object, ...]]:
        """Rows of `query` in the store, its parameters written `{}` (made $n or %s for the database)."""
        if self.dsn.startswith("mysql://"):
            return await asyncio.to_thread(_mysql_fetch, self.dsn, query.replace("{}", "%s"), args)
        n = iter(range(1, len(args) + 1))
        conn = await asyncpg.connect(self.dsn)
        try:
            return [tuple(r) for r in await conn.fetch(re.sub(r"\{\}", lambda _: f"${next(n)}", query), *args)]
        finally:
            await conn.close()

    async def store_execute(self, query: str, *args: object) -> None:
        await self.store_fetch(query, *args)

    def _send(self, packet: AuthPacket | AcctPacket, port: int) -> int:
        raw = packet.RequestPacket()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.connect(("127.0.0.1", port))
            for _ in range(5):
                sock.sendall(raw)
                sock.settimeout(2)
                with contextlib.suppress(TimeoutError):
                    data = sock.recv(4096)
                    reply = packet.CreateReply(packet=data)
                    if packet.VerifyReply(reply, data):
                        return int(reply.code)
        raise AssertionError(f"FreeRADIUS did not answer on port {port}:\n{self.log()[-3000:]}")

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(5)
        self._out.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def _mysql_fetch(dsn: str, query: str, args: tuple[object, ...]) -> list[tuple[object, ...]]:
    import pymysql

    parts = urlsplit(dsn)
    conn = pymysql.connect(host=parts.hostname, port=parts.port or 3306, user=unquote(parts.username or ""),
                           password=unquote(parts.password or ""), database=unquote(parts.path.lstrip("/")),
                           autocommit=True, charset="utf8mb4")
    try:
        with conn.cursor() as cur:
            cur.execute(query, args)
            return [tuple(r) for r in cur.fetchall()]
    finally:
        conn.close()
