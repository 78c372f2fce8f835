"""`routeros`: MikroTik RouterOS through its REST API (v7; aiohttp) or its binary API (v6 and v7;
routeros_api.py), verified by read-back. The address scheme chooses: https:// or http:// is REST,
api://host[:8728] the API over TCP, api-ssl://host[:8729] the API over TLS.

Options: username (required), tls_fingerprint (SHA-256 of the router's certificate, hex, colons
allowed) or ca_file (with tls_server_name, the name its certificate carries), timeout (seconds per
request), manage_foreign_entries (false), entry_comment, max_reply_bytes (1 MiB). The password is
the file named by the device's `credential`. Service keys and what on/off mean: routeros_proto.py;
both protocols run the same plans. Every operation looks its objects up by name first; `.id` values
are never kept between operations (they change when the router reboots). The API keeps one
logged-in connection per device and opens a new one when it fails.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from agent.drivers.base import DriverContext
from agent.drivers.body import over_limit, read_body
from agent.drivers.routeros_api import Connection, Fatal, ProtocolError, ReplyTooLong, Trap
from agent.drivers.routeros_proto import (
    Request,
    Row,
    Service,
    api_words,
    classify,
    cuts_off,
    error_text,
    ip_or_none,
    is_absent,
    is_missing,
    lifeline_reads,
    loads,
    login_error,
    no_rest_api,
    parse_rows,
    parse_service,
    plan,
    policy_lists,
    policy_reads,
    reads_for,
    state_of,
    trap_error,
    unused_lists,
)
from agent.errors import AgentError, ConfigError, NoAnswerError, PermanentError, TransientError, UnreachableError
from agent.model.device import Device, State
from agent.text import clean

OPTIONS = {"username", "tls_fingerprint", "ca_file", "tls_server_name", "timeout", "manage_foreign_entries",
           "entry_comment", "max_reply_bytes", "address_lists"}
COMMENT = "managed by pgmq-edge-agent"
SCHEMES = {"https": 443, "http": 80, "api": 8728, "api-ssl": 8729}
NAME_HINT = ("; when the certificate names the router (e.g. its common name only) and the address is an IP, "
             "set tls_server_name to that name")


def name_hint(exc: BaseException) -> str:
    """The tls_server_name hint, when a certificate was refused for the name it carries."""
    text = str(exc).lower()
    return NAME_HINT if "mismatch" in text and ("hostname" in text or "ip address" in text) else ""


KEEPALIVE = 2.0  # seconds an idle REST connection may be reused: RouterOS may drop or answer stale on older ones


@dataclass(frozen=True)
class Settings:
    base: str                 # scheme://host[:port]
    username: str
    credential: str
    timeout: float
    fingerprint: bytes | None = None
    ca_file: str | None = None
    manage_foreign: bool = False
    comment: str = COMMENT
    max_reply: int = 1 << 20
    server_name: str | None = None  # the name the certificate must carry, when not the address's host
    address_lists: tuple[str, ...] = ()  # lists a firewall rule must use (besides those of known services)

    @property
    def api(self) -> bool:
        """The binary API (api://, api-ssl://) rather than REST."""
        return self.base.startswith("api")

    @property
    def tls(self) -> bool:
        return self.base.startswith(("https:", "api-ssl:"))

    def host_port(self) -> tuple[str, int]:
        parts = urlsplit(self.base)
        return parts.hostname or "", parts.port or SCHEMES[parts.scheme]


_SERVER_NAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9_]([A-Za-z0-9_-]{0,62})(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,62}))*$")


def parse_fingerprint(text: Any) -> bytes:
    digest = str(text).strip().lower().removeprefix("sha256:").replace(":", "").replace(" ", "")
    try:
        raw = bytes.fromhex(digest)
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise ConfigError("routeros: tls_fingerprint must be the certificate's SHA-256 digest in hex "
                          "(64 digits, colons allowed), as `openssl x509 -noout -fingerprint -sha256` prints it")
    return raw


def parse_base(address: str | None) -> str:
    """scheme://host[:port]; a bare host means https. The API schemes get their default port written out."""
    text = str(address or "")
    parts = urlsplit(text if "://" in text else f"https://{text}")
    if parts.scheme not in SCHEMES or not parts.hostname or parts.path not in ("", "/"):
        raise ConfigError(f"routeros: address {clean(text, 100)!r} must be https://host[:port] (REST, RouterOS v7; "
                          f"or http://), api://host[:port] or api-ssl://host[:port] (the API, RouterOS v6 and v7)")
    if parts.username or parts.password:
        raise ConfigError("routeros: put no user or password in the address: use `username` and `credential`")
    try:
        port = parts.port
    except ValueError:
        raise ConfigError(f"routeros: address {clean(text, 100)!r} has a bad port") from None
    if parts.scheme.startswith("api") and port is None:
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        return f"{parts.scheme}://{host}:{SCHEMES[parts.scheme]}"
    return f"{parts.scheme}://{parts.netloc}"


def settings(device: Device, default_timeout: float) -> Settings:
    """The device's options, checked: ConfigError names the option that cannot work."""
    o = device.options
    if unknown := sorted(set(o) - OPTIONS):
        raise ConfigError(f"routeros: unknown option(s) {unknown}; known: {sorted(OPTIONS)}")
    base = parse_base(device.address)
    user = o.get("username")
    if not isinstance(user, str) or not user or ":" in user or not user.isprintable():
        raise ConfigError("routeros: username is required (printable, without ':')")
    if not device.credential:
        raise ConfigError("routeros: the device needs a credential: the name of the file holding the password")
    if "tls_fingerprint" in o and "ca_file" in o:
        raise ConfigError("routeros: set tls_fingerprint or ca_file, not both")
    if base.startswith(("http:", "api:")) and ("tls_fingerprint" in o or "ca_file" in o):
        raise ConfigError("routeros: tls_fingerprint and ca_file need an https:// or api-ssl:// address")
    try:
        timeout = float(o.get("timeout", default_timeout))
        max_reply = int(o.get("max_reply_bytes", 1 << 20))
    except (TypeError, ValueError):
        raise ConfigError("routeros: timeout and max_reply_bytes must be numbers") from None
    if timeout <= 0 or max_reply < 1024:
        raise ConfigError("routeros: timeout must be positive and max_reply_bytes at least 1024")
    comment = o.get("entry_comment", COMMENT)
    if not isinstance(comment, str) or not 0 < len(comment) <= 255 or not comment.isprintable():
        raise ConfigError("routeros: entry_comment must be printable text of 1-255 characters")
    if not isinstance(o.get("manage_foreign_entries", False), bool):
        raise ConfigError("routeros: manage_foreign_entries must be true or false")
    fingerprint = parse_fingerprint(o["tls_fingerprint"]) if "tls_fingerprint" in o else None
    name = o.get("tls_server_name")
    if name is not None:
        if not isinstance(name, str) or not _SERVER_NAME.match(name):
            raise ConfigError("routeros: tls_server_name must be a DNS name, the one in the router's certificate")
        if fingerprint is not None or base.startswith(("http:", "api:")):
            raise ConfigError("routeros: tls_server_name is checked with ca_file (or the system's CAs) over https:// "
                              "or api-ssl://; a pinned tls_fingerprint checks no name")
    return Settings(base, user, device.credential, timeout, fingerprint, o.get("ca_file"),
                    o.get("manage_foreign_entries", False), comment, max_reply, name,
                    parse_lists(o.get("address_lists", ())))


def parse_lists(value: Any) -> tuple[str, ...]:
    """The `address_lists` option: a list of names, or one comma-separated string."""
    names = value.split(",") if isinstance(value, str) else value
    if not isinstance(names, list | tuple) or not all(isinstance(n, str) for n in names):
        raise ConfigError("routeros: address_lists must be a list of address-list names (or one string, "
                          "comma-separated)")
    names = [n.strip() for n in names if n.strip()]
    if bad := [n for n in names if "/" in n or not n.isprintable() or len(n) > 255]:
        raise ConfigError(f"routeros: address_lists: {clean(bad[0], 60)!r} is not an address-list name")
    return tuple(dict.fromkeys(names))


def transport_error(exc: BaseException, what: str, s: Settings) -> AgentError:
    """A transport failure as one of our kinds (mapped here, once)."""
    if isinstance(exc, aiohttp.ServerFingerprintMismatch):
        return ConfigError(f"{what}: the router's certificate has SHA-256 fingerprint {exc.got.hex(':')}, not the "
                           f"pinned tls_fingerprint: make sure it is the right router, then update the option")
    if isinstance(exc, aiohttp.ClientConnectorCertificateError | aiohttp.ClientSSLError | ssl.SSLError):
        return ConfigError(f"{what}: TLS: {clean(exc, 200)}: pin the router's certificate with tls_fingerprint "
                           f"or name its CA in ca_file{name_hint(exc)}")
    if isinstance(exc, TimeoutError):
        return NoAnswerError(f"{what}: no answer within {s.timeout:g}s")
    if isinstance(exc, aiohttp.ClientConnectorError):
        return UnreachableError(f"{what}: cannot connect: {clean(exc.os_error or exc, 200)}")
    return TransientError(f"{what}: {type(exc).__name__}: {clean(exc, 200)}")


def api_error(exc: BaseException, what: str, s: Settings, connecting: bool = False) -> AgentError:
    """An API transport failure as one of our kinds (mapped here, once)."""
    if isinstance(exc, ssl.SSLError):
        return ConfigError(f"{what}: TLS: {clean(exc, 200)}: pin the router's certificate with tls_fingerprint or "
                           f"name its CA in ca_file{name_hint(exc)} (and give "
                           f"the api-ssl service a certificate: without one "
                           f"RouterOS offers only anonymous ciphers)")
    if isinstance(exc, TimeoutError):
        return NoAnswerError(f"{what}: no answer within {s.timeout:g}s")
    if isinstance(exc, ReplyTooLong):
        return over_limit(what, s.max_reply)
    if isinstance(exc, ProtocolError):
        return ConfigError(f"{what}: the other end does not speak the RouterOS API ({clean(exc, 200)}): check the "
                           f"address's port (api 8728, api-ssl 8729)")
    if isinstance(exc, Fatal):
        return TransientError(f"{what}: the router ended the API session: {clean(exc, 200)}")
    if isinstance(exc, asyncio.IncompleteReadError):
        return TransientError(f"{what}: the router closed the API connection")
    if connecting and isinstance(exc, OSError):
        return UnreachableError(f"{what}: cannot connect: {clean(exc, 200)}")
    return TransientError(f"{what}: {type(exc).__name__}: {clean(exc, 200)}")


class _Dropped(TransientError):
    """The connection closed before any answer: a read may be sent once more."""

    def __init__(self, error: AgentError) -> None:
        super().__init__(str(error))
        self.error = error


API_FAILURES = (OSError, asyncio.IncompleteReadError, TimeoutError, Fatal, ProtocolError, ReplyTooLong)


class RouterOsDriver:
    name = "routeros"

    def __init__(self, context: DriverContext | None = None) -> None:
        self._context = context or DriverContext()
        self._session: aiohttp.ClientSession | None = None
        self._ca: dict[str, ssl.SSLContext] = {}
        # one Fingerprint per digest: aiohttp keys its pooled connections by this object, so a new one
        # per request would open (and TLS-handshake) a new connection for every request
        self._pins: dict[bytes, aiohttp.Fingerprint] = {}
        self._conns: dict[tuple[str, Settings], Connection] = {}   # the API: one connection per device
        self._opening: dict[tuple[str, Settings], asyncio.Lock] = {}

    def validate_options(self, device: Device) -> None:
        settings(device, self._context.device_timeout)

    async def read(self, device: Device, service: str) -> State:
        state = (await self.read_many(device, [service]))[service]
        if isinstance(state, AgentError):
            raise state
        return state

    async def read_many(self, device: Device, services: list[str]) -> dict[str, State | AgentError]:
        """The states of many services, with one print per RouterOS menu; a service that cannot be
        read (a bad key, a missing object) is an error in the result, the others are read."""
        out: dict[str, State | AgentError] = {}
        parsed = []
        for key in services:
            try:
                parsed.append(parse_service(key))
            except AgentError as exc:
                out[key] = exc
        if parsed:
            s = self._settings(device)
            replies = await self._print(device, s, reads_for(parsed))
            for svc in parsed:
                try:
                    out[svc.key] = state_of(svc, replies)
                except AgentError as exc:
                    out[svc.key] = exc
        return out

    async def apply(self, device: Device, service: str, state: State) -> None:
        svc = parse_service(service)
        s = self._settings(device)
        replies = await self._print(device, s, reads_for([svc]))
        writes = plan(svc, replies, state, s.comment, s.manage_foreign)
        if writes and state == "off" and svc.kind is not None and svc.kind.menu == "interface":
            await self._refuse_cutting_off(device, s, svc)
        for req in writes:
            await self._call(device, s, req, f"{device.id}: {svc}: {self._label(s, req)}")

    async def _refuse_cutting_off(self, device: Device, s: Settings, svc: Service) -> None:
        """PermanentError when the interface to disable carries the address the agent reaches the
        router at (directly, as a bridge port, or under a VLAN). Only an IP address is checked."""
        host = ip_or_none(s.host_port()[0].strip("[]"))
        if host is not None:
            replies = await self._print(device, s, lifeline_reads(svc.name, host.version))
            if error := cuts_off(svc, host, replies):
                raise error

    async def probe(self, device: Device) -> str:
        """What answers: the protocol and the RouterOS version (/system/resource)."""
        s = self._settings(device)
        req = Request("GET", "/rest/system/resource")
        doc = await self._call(device, s, req, f"{device.id}: {self._label(s, req)}")
        row = (doc[0] if doc else {}) if isinstance(doc, list) else doc
        version = row.get("version") if isinstance(row, dict) else None
        scheme = s.base.partition(":")[0]
        protocol = f"the API ({scheme}{', TLS' if s.tls else ''})" if s.api else f"REST ({scheme})"
        return f"RouterOS {clean(version or '(version not shown)', 60)} over {protocol}"

    async def check_policy(self, device: Device, services: Iterable[str]) -> list[str]:
        """Problems with the device's suspension policy, one sentence each: every address list named by
        `services` (the device's known services) or by the address_lists option must be used by an
        enabled firewall rule, or suspending through it blocks nobody. [] when all is well."""
        s = self._settings(device)
        lists = policy_lists(services, s.address_lists)
        if not lists:
            return []
        return unused_lists(lists, await self._print(device, s, policy_reads(lists)))

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        conns, self._conns = list(self._conns.values()), {}
        for conn in conns:
            await conn.aclose()

    # -- transport -----------------------------------------------------------------------

    async def _print(self, device: Device, s: Settings, reads: dict[str, Request]) -> dict[str, list[Row]]:
        replies = {}
        for label, req in reads.items():
            what = f"{device.id}: {self._label(s, req)}"
            replies[label] = parse_rows(await self._call(device, s, req, what), what)
        return replies

    @staticmethod
    def _label(s: Settings, req: Request) -> str:
        return " ".join(w for w in api_words(req) if not w.startswith("?"))[:200] if s.api else \
            f"{req.method} {req.path}"

    async def _call(self, device: Device, s: Settings, req: Request, what: str) -> Any:
        if s.api:
            return await self._api_call(device, s, req, what)
        return await self._rest_call(device, s, req, what)

    async def _rest_call(self, device: Device, s: Settings, req: Request, what: str) -> Any:
        """One request; a read whose connection closed without an answer is sent once more (RouterOS
        may close a kept-alive connection just as it is reused); a write is not (the caller re-reads)."""
        is_read = req.method == "GET" or req.path.endswith("/print")
        try:
            return await self._rest_once(device, s, req, what)
        except _Dropped as dropped:
            if not is_read:
                raise dropped.error from None
        try:
            return await self._rest_once(device, s, req, what)
        except _Dropped as dropped:
            raise dropped.error from None

    async def _rest_once(self, device: Device, s: Settings, req: Request, what: str) -> Any:
        pair = f"{s.username}:{self._password(device, s)}".encode()
        kwargs: dict[str, Any] = {"headers": {"Authorization": "Basic " + base64.b64encode(pair).decode()},
                                  "timeout": aiohttp.ClientTimeout(total=s.timeout), "ssl": self._ssl(s),
                                  **({"server_hostname": s.server_name} if s.server_name else {}),
                                  "allow_redirects": False}
        if req.body is not None:
            kwargs["json"] = req.body
        failure: AgentError | None = None
        try:
            async with self._client().request(req.method, s.base + req.path, **kwargs) as resp:
                status, location = resp.status, resp.headers.get("Location")
                body = await read_body(resp, s.max_reply, what)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            failure = transport_error(exc, what, s)
            if isinstance(exc, aiohttp.ServerDisconnectedError):
                failure = _Dropped(failure)
        if failure is not None:  # raised outside the handler: no library exception rides along as context
            raise failure
        return self._reply(req, status, location, body, what, s)

    def _reply(self, req: Request, status: int, location: str | None, body: bytes, what: str,
               s: Settings) -> Any:
        if no_rest_api(status, body):
            host, port = s.host_port()
            raise ConfigError(f"{what}: this router has no REST API (RouterOS v6?): use api://{host} (the api "
                              f"service, port 8728) or api-ssl://{host} (8729) as the device address; REST needs "
                              f"RouterOS 7.1 or later and the www-ssl (or www) service on port {port}")
        if status == 404 and req.missing_ok:
            return None
        if req.absent_ok and 400 <= status < 500 and is_absent(error_text(body)):
            return []
        if error := classify(status, body, what, f"user {s.username!r} (password file {s.credential!r})", location):
            raise error
        if not body.strip():
            return None
        try:
            return loads(body)
        except ValueError:
            pass
        raise PermanentError(f"{what}: the reply is not JSON: {clean(body.decode('utf-8', 'replace'), 100)}")

    # -- the binary API ------------------------------------------------------------------------

    async def _api_call(self, device: Device, s: Settings, req: Request, what: str) -> Any:
        """One command on the device's connection. A read on a kept connection that turns out dead
        (the router rebooted) is sent once more on a new one; a write is not (the caller re-reads)."""
        words = api_words(req)
        is_read = req.method == "GET" or req.path.endswith("/print")
        for again in (True, False):
            conn, fresh = await self._api_connection(device, s, what)
            failure: AgentError | None = None
            try:
                async with asyncio.timeout(s.timeout):
                    reply = await conn.call(words)
            except Trap as trap:
                if req.missing_ok and is_missing(trap.message):
                    return None
                if req.absent_ok and is_absent(trap.message):
                    return []
                failure = trap_error(trap.message, trap.category, what)
            except API_FAILURES as exc:
                if again and is_read and not fresh and isinstance(exc, asyncio.IncompleteReadError | ConnectionError):
                    continue
                failure = api_error(exc, what, s)
            if failure is not None:  # raised outside the handler: no library exception rides along
                raise failure
            return reply.rows if is_read else None
        raise AssertionError("unreachable")

    async def _api_connection(self, device: Device, s: Settings, what: str) -> tuple[Connection, bool]:
        """The device's logged-in connection, and whether it was opened just now. One per device: a
        connection made with the device's earlier settings is closed."""
        key = (device.id, s)
        async with self._opening.setdefault(key, asyncio.Lock()):
            conn = self._conns.get(key)
            if conn is not None and conn.usable:
                return conn, False
            for old in [k for k in self._conns if k[0] == device.id]:
                self._conns.pop(old).close()
            for old in [k for k in self._opening if k[0] == device.id and k != key]:
                del self._opening[old]
            conn = await self._api_open(device, s, what)
            self._conns[key] = conn
            return conn, True

    async def _api_open(self, device: Device, s: Settings, what: str) -> Connection:
        """Connect, check the pinned certificate, log in; a failure closes what was opened."""
        host, port = s.host_port()
        tls = self._api_tls(s)
        password = self._password(device, s)
        login = f"user {s.username!r} (password file {s.credential!r})"
        conn: Connection | None = None
        failure: AgentError | None = None
        try:
            async with asyncio.timeout(s.timeout):
                try:
                    conn = await Connection.open(host, port, tls, s.max_reply, s.server_name)
                except OSError as exc:
                    if isinstance(exc, ssl.SSLError | TimeoutError):
                        raise
                    failure = api_error(exc, what, s, connecting=True)
                if conn is not None:
                    failure = self._check_pin(conn, s, what)
                    if failure is None:
                        await conn.login(s.username, password)
        except Trap as trap:
            failure = login_error(trap.message, f"{what}: login", login)
        except API_FAILURES as exc:
            failure = api_error(exc, f"{what}: login" if conn is not None else what, s)
            if conn is not None and isinstance(exc, asyncio.IncompleteReadError | ConnectionError):
                failure = TransientError(f"{failure} before answering the login: if it keeps doing so, check that "
                                         f"the router's {'api-ssl' if s.tls else 'api'} service allows this host "
                                         f"(`/ip service print`, column ADDRESS)")
        except BaseException:  # cancelled (the operation's deadline): leave no half-open session behind
            if conn is not None:
                conn.close()
            raise
        if failure is not None or conn is None:
            if conn is not None:
                await conn.aclose()
            raise failure or AssertionError("no connection and no error")
        return conn

    @staticmethod
    def _check_pin(conn: Connection, s: Settings, what: str) -> AgentError | None:
        if s.fingerprint is None:
            return None
        der = conn.peer_certificate() or b""
        got = hashlib.sha256(der).digest()
        if got == s.fingerprint:
            return None
        return ConfigError(f"{what}: the router's certificate has SHA-256 fingerprint {got.hex(':')}, not the pinned "
                           f"tls_fingerprint: make sure it is the right router, then update the option")

    def _api_tls(self, s: Settings) -> ssl.SSLContext | None:
        if not s.tls:
            return None
        if s.fingerprint is not None:  # the digest is checked after the handshake; the CA chain is not
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            return ctx
        verify = self._ssl(s)
        return verify if isinstance(verify, ssl.SSLContext) else ssl.create_default_context()

    def _password(self, device: Device, s: Settings) -> str:
        if self._context.credentials is None:
            raise ConfigError(f"{device.id}: credential {s.credential!r} named but the agent has no credential store")
        return self._context.credentials.get(s.credential)

    def _ssl(self, s: Settings) -> ssl.SSLContext | aiohttp.Fingerprint | bool:
        if s.fingerprint is not None:  # the digest is checked; the CA chain is not
            return self._pins.setdefault(s.fingerprint, aiohttp.Fingerprint(s.fingerprint))
        if s.ca_file is None:
            return True
        if s.ca_file not in self._ca:
            try:
                self._ca[s.ca_file] = ssl.create_default_context(cafile=s.ca_file)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"routeros: ca_file {s.ca_file!r} cannot be used: {clean(exc, 200)}") from None
        return self._ca[s.ca_file]

    def _settings(self, device: Device) -> Settings:
        return settings(device, self._context.device_timeout)

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(keepalive_timeout=KEEPALIVE))
        return self._session
