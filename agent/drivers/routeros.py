"""`routeros`: MikroTik RouterOS v7 through its REST API (aiohttp), verified by read-back.

Options: username (required), tls_fingerprint (SHA-256 of the router's certificate, hex, colons
allowed) or ca_file, timeout (seconds per request), manage_foreign_entries (false), entry_comment,
max_reply_bytes (1 MiB). The password is the file named by the device's `credential`.
Service keys and what on/off mean: routeros_proto.py. Every operation looks its objects up by
name first; `.id` values are never kept between operations (they change when the router reboots).
"""

from __future__ import annotations

import base64
import json
import ssl
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from agent.drivers.base import Device, DriverContext, State
from agent.drivers.body import read_body
from agent.drivers.routeros_proto import Request, Row, classify, parse_rows, parse_service, plan, reads_for, state_of
from agent.errors import AgentError, ConfigError, NoAnswerError, PermanentError, TransientError, UnreachableError
from agent.text import clean

OPTIONS = {"username", "tls_fingerprint", "ca_file", "timeout", "manage_foreign_entries", "entry_comment",
           "max_reply_bytes"}
COMMENT = "managed by pgmq-edge-agent"


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
    text = str(address or "")
    parts = urlsplit(text if "://" in text else f"https://{text}")
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
        raise ConfigError(f"routeros: address {clean(text, 100)!r} must be https://host[:port] (or http://)")
    if parts.username or parts.password:
        raise ConfigError("routeros: put no user or password in the address: use `username` and `credential`")
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        raise ConfigError(f"routeros: address {clean(text, 100)!r} has a bad port") from None
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
    if base.startswith("http:") and ("tls_fingerprint" in o or "ca_file" in o):
        raise ConfigError("routeros: tls_fingerprint and ca_file need an https:// address")
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
    return Settings(base, user, device.credential, timeout, fingerprint, o.get("ca_file"),
                    o.get("manage_foreign_entries", False), comment, max_reply)


def transport_error(exc: BaseException, what: str, s: Settings) -> AgentError:
    """A transport failure as one of our kinds (mapped here, once)."""
    if isinstance(exc, aiohttp.ServerFingerprintMismatch):
        return ConfigError(f"{what}: the router's certificate has SHA-256 fingerprint {exc.got.hex(':')}, not the "
                           f"pinned tls_fingerprint: make sure it is the right router, then update the option")
    if isinstance(exc, aiohttp.ClientConnectorCertificateError | aiohttp.ClientSSLError | ssl.SSLError):
        return ConfigError(f"{what}: TLS: {clean(exc, 200)}: pin the router's certificate with tls_fingerprint "
                           f"or name its CA in ca_file")
    if isinstance(exc, TimeoutError):
        return NoAnswerError(f"{what}: no answer within {s.timeout:g}s")
    if isinstance(exc, aiohttp.ClientConnectorError):
        return UnreachableError(f"{what}: cannot connect: {clean(exc.os_error or exc, 200)}")
    return TransientError(f"{what}: {type(exc).__name__}: {clean(exc, 200)}")


class RouterOsDriver:
    name = "routeros"

    def __init__(self, context: DriverContext | None = None) -> None:
        self._context = context or DriverContext()
        self._session: aiohttp.ClientSession | None = None
        self._ca: dict[str, ssl.SSLContext] = {}

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
        for req in plan(svc, replies, state, s.comment, s.manage_foreign):
            await self._call(device, s, req, f"{device.id}: {svc}: {req.method} {req.path}")

    async def probe(self, device: Device) -> None:
        await self._call(device, self._settings(device), Request("GET", "/rest/system/identity"),
                         f"{device.id}: GET /rest/system/identity")

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- transport -----------------------------------------------------------------------

    async def _print(self, device: Device, s: Settings, reads: dict[str, Request]) -> dict[str, list[Row]]:
        replies = {}
        for label, req in reads.items():
            what = f"{device.id}: {req.method} {req.path}"
            replies[label] = parse_rows(await self._call(device, s, req, what), what)
        return replies

    async def _call(self, device: Device, s: Settings, req: Request, what: str) -> Any:
        pair = f"{s.username}:{self._password(device, s)}".encode()
        kwargs: dict[str, Any] = {"headers": {"Authorization": "Basic " + base64.b64encode(pair).decode()},
                                  "timeout": aiohttp.ClientTimeout(total=s.timeout), "ssl": self._ssl(s),
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
        if failure is not None:  # raised outside the handler: no library exception rides along as context
            raise failure
        return self._reply(req, status, location, body, what, s)

    def _reply(self, req: Request, status: int, location: str | None, body: bytes, what: str,
               s: Settings) -> Any:
        if status == 404 and req.missing_ok:
            return None
        if error := classify(status, body, what, f"user {s.username!r} (password file {s.credential!r})", location):
            raise error
        if not body.strip():
            return None
        try:
            return json.loads(body)
        except ValueError:
            pass
        raise PermanentError(f"{what}: the reply is not JSON: {clean(body.decode('utf-8', 'replace'), 100)}")

    def _password(self, device: Device, s: Settings) -> str:
        if self._context.credentials is None:
            raise ConfigError(f"{device.id}: credential {s.credential!r} named but the agent has no credential store")
        return self._context.credentials.get(s.credential)

    def _ssl(self, s: Settings) -> ssl.SSLContext | aiohttp.Fingerprint | bool:
        if s.fingerprint is not None:
            return aiohttp.Fingerprint(s.fingerprint)  # the digest is checked; the CA chain is not
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
            self._session = aiohttp.ClientSession()
        return self._session
