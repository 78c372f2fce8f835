"""`http`: a generic JSON-over-HTTP driver, configured entirely by device options.

Options:
  read_path    path template to GET the state, with {service} and {device} (required)
  set_path     path template for the write (default: read_path)
  set_method   GET, POST, PUT, PATCH or DELETE (default PUT)
  set_body     JSON template; a string exactly "{value}" becomes the mapped value with its JSON type,
               other strings get {service}/{device} filled in (default {"value": "{value}"})
  state_pointer  RFC 6901 JSON Pointer into the read response (default "": the whole document)
  on_value / off_value  the JSON values meaning on and off (default true / false)
  headers      extra request headers (object of strings)
  timeout      seconds per request (default AGENT_DEVICE_TIMEOUT)
  scheme       used when the address has none (default "http"); verify_tls (default true)
  probe_path   GET this for probe(); without it, probe() opens a TCP connection
  max_reply_bytes  replies longer than this are refused (default 1 MiB); redirects are never followed
  service_pattern  regex a service key must match before anything is sent (default: the contract's)
  list_path    path template (with {device}) whose GET returns a JSON array of items for many services:
               read_many() reads them all in one request; list_key is the JSON Pointer, within an
               item, to its service key (default "/name"); the state is found with state_pointer
Credentials (device.credential names a file on the agent host): {"username", "password"} means
HTTP Basic, {"token"} or a plain string means a Bearer token. Secrets never appear in errors or logs.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
from typing import Any
from urllib.parse import quote, urlsplit

import aiohttp

from agent.drivers.base import DriverContext
from agent.drivers.body import read_body
from agent.errors import AgentError, ConfigError, NoAnswerError, PermanentError, TransientError, UnreachableError
from agent.model.device import Device, State
from agent.model.names import SERVICE_PATTERN
from agent.text import clean

METHODS = {"GET", "POST", "PUT", "PATCH", "DELETE"}
MAX_REPLY_BYTES = 1024 * 1024
_MISSING = object()


def render_path(template: str, device: str, service: str) -> str:
    return template.replace("{service}", quote(service, safe="")).replace("{device}", quote(device, safe=""))


def render_body(template: Any, value: Any, device: str, service: str) -> Any:
    """Fill a JSON template: "{value}" keeps the value's JSON type; other strings are filled as text."""
    if isinstance(template, str):
        if template == "{value}":
            return value
        return template.replace("{service}", service).replace("{device}", device)
    if isinstance(template, list):
        return [render_body(v, value, device, service) for v in template]
    if isinstance(template, dict):
        return {k: render_body(v, value, device, service) for k, v in template.items()}
    return template


def resolve_pointer(doc: Any, pointer: str) -> Any:
    """RFC 6901; returns _MISSING when the pointer does not resolve."""
    if pointer == "":
        return doc
    if not pointer.startswith("/"):
        return _MISSING
    for raw in pointer[1:].split("/"):
        token = raw.replace("~1", "/").replace("~0", "~")
        if isinstance(doc, dict) and token in doc:
            doc = doc[token]
        elif isinstance(doc, list) and token.isdigit() and int(token) < len(doc):
            doc = doc[int(token)]
        else:
            return _MISSING
    return doc


def same_json(a: Any, b: Any) -> bool:
    """JSON equality: 1 is not true, 1 is 1.0."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    return bool(a == b)


def to_state(value: Any, on_value: Any, off_value: Any) -> State | None:
    if same_json(value, on_value):
        return "on"
    if same_json(value, off_value):
        return "off"
    return None


def classify_status(status: int, what: str, body: str, location: str | None = None,
                    credential: str | None = None) -> None:
    """Raise the error kind an HTTP status means; return for 2xx. Redirects are never followed: a
    device that points elsewhere would have the agent operate (and "verify") another server."""
    if status < 300:
        return
    if status < 400:
        where = clean(location, 200) if location else "no Location"
        raise PermanentError(f"{what}: HTTP {status} redirect to {where}: not followed (fix the device's address)")
    excerpt = clean(body.strip(), 200)
    message = f"{what}: HTTP {status}" + (f": {excerpt}" if excerpt else "")
    if status in (401, 403):
        named = f"credential {credential!r}" if credential else "no credential (the device's `credential`)"
        raise ConfigError(f"{message}: the device refused {named}: fix the secret or the device's user rights")
    if status >= 500 or status in (408, 425, 429):
        raise TransientError(message)
    raise PermanentError(message)


async def _bounded_text(resp: aiohttp.ClientResponse, limit: int, what: str) -> str:
    """The whole reply body as text, read no further than `limit` bytes: a device cannot make the agent hold more."""
    body = await read_body(resp, limit, what)
    try:
        return body.decode(resp.charset or "utf-8", errors="replace")
    except LookupError:  # a charset Python does not know
        return body.decode("utf-8", errors="replace")


def items_by_key(doc: Any, key_pointer: str, what: str) -> dict[str, Any]:
    """A list reply as {service key: item}; a reply that is not a list of keyed items is permanent."""
    if not isinstance(doc, list):
        raise PermanentError(f"{what}: list_path must answer a JSON array, got {clean(json.dumps(doc), 100)}")
    out: dict[str, Any] = {}
    for item in doc:
        key = resolve_pointer(item, key_pointer)
        if isinstance(key, str):
            out.setdefault(key, item)
    return out


def check_service(device: Device, service: str) -> None:
    """Refuse a service key the device's syntax does not allow, before any request is built."""
    pattern = device.options.get("service_pattern", SERVICE_PATTERN)
    if not isinstance(service, str) or not re.fullmatch(pattern, service):
        raise PermanentError(f"{device.id}: service key {clean(service, 100)!r} does not match {pattern!r}")


class HttpDriver:
    name = "http"

    def __init__(self, context: DriverContext | None = None) -> None:
        self._context = context or DriverContext()
        self._session: aiohttp.ClientSession | None = None

    def validate_options(self, device: Device) -> None:
        o = device.options
        if not isinstance(o.get("read_path"), str) or not o["read_path"].startswith("/"):
            raise ConfigError("http: read_path is required and must start with /")
        if "set_path" in o and (not isinstance(o["set_path"], str) or not o["set_path"].startswith("/")):
            raise ConfigError("http: set_path must start with /")
        if "list_path" in o and (not isinstance(o["list_path"], str) or not o["list_path"].startswith("/")):
            raise ConfigError("http: list_path must start with /")
        if not isinstance(o.get("list_key", "/name"), str) or not o.get("list_key", "/name").startswith("/"):
            raise ConfigError("http: list_key must be a JSON Pointer (starting with /) into a list item")
        if str(o.get("set_method", "PUT")).upper() not in METHODS:
            raise ConfigError(f"http: set_method must be one of {', '.join(sorted(METHODS))}")
        if not isinstance(o.get("state_pointer", ""), str):
            raise ConfigError("http: state_pointer must be a JSON Pointer string")
        headers = o.get("headers", {})
        if not isinstance(headers, dict) or not all(isinstance(v, str) for v in headers.values()):
            raise ConfigError("http: headers must be an object of strings")
        try:
            if float(o.get("timeout", 1)) <= 0:
                raise ValueError
        except (TypeError, ValueError):
            raise ConfigError("http: timeout must be a positive number of seconds") from None
        try:
            re.compile(o.get("service_pattern", SERVICE_PATTERN))
        except (re.error, TypeError):
            raise ConfigError("http: service_pattern must be a regular expression") from None
        limit = o.get("max_reply_bytes", MAX_REPLY_BYTES)
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise ConfigError("http: max_reply_bytes must be a positive integer")
        if same_json(o.get("on_value", True), o.get("off_value", False)):
            raise ConfigError("http: on_value and off_value must differ")
        if not device.address:
            raise ConfigError("http: the device needs an address (host[:port] or URL)")

    async def read(self, device: Device, service: str) -> State:
        check_service(device, service)
        o = device.options
        path = render_path(o["read_path"], device.id, service)
        doc = await self._request(device, "GET", path, None, want_json=True)
        return self._state_in(device, doc, service, path)

    def _state_in(self, device: Device, doc: Any, service: str, path: str) -> State:
        o = device.options
        pointer = o.get("state_pointer", "")
        value = resolve_pointer(doc, pointer)
        if value is _MISSING:
            raise PermanentError(f"{device.id}: GET {path}: state_pointer {pointer!r} not found in the reply")
        state = to_state(value, o.get("on_value", True), o.get("off_value", False))
        if state is None:
            raise PermanentError(f"{device.id}: device reported {clean(json.dumps(value), 100)} for {service}, "
                                 f"neither on_value nor off_value")
        return state

    def can_read_many(self, device: Device) -> bool:
        """Many services in one request only through a `list_path`: without it the agent reads
        them one by one, each read under its own deadline (and a reconcile keeps its pace)."""
        return "list_path" in device.options

    async def read_many(self, device: Device, services: list[str]) -> dict[str, State | AgentError]:
        """Many services: one GET of `list_path` where the device has one, else one read each."""
        out: dict[str, State | AgentError] = {}
        for service in services:
            try:
                check_service(device, service)
            except PermanentError as exc:
                out[service] = exc
        wanted = [svc for svc in services if svc not in out]
        o = device.options
        if "list_path" not in o:
            for service in wanted:
                try:
                    out[service] = await self.read(device, service)
                except AgentError as exc:
                    out[service] = exc
            return out
        path = render_path(o["list_path"], device.id, "")
        doc = await self._request(device, "GET", path, None, want_json=True)
        found = items_by_key(doc, o.get("list_key", "/name"), f"{device.id}: GET {path}")
        for service in wanted:
            item = found.get(service, _MISSING)
            if item is _MISSING:
                out[service] = PermanentError(f"{device.id}: GET {path}: no item for {clean(service, 100)} "
                                              "in the list")
                continue
            try:
                out[service] = self._state_in(device, item, service, path)
            except AgentError as exc:
                out[service] = exc
        return out

    async def apply(self, device: Device, service: str, state: State) -> None:
        check_service(device, service)
        o = device.options
        method = str(o.get("set_method", "PUT")).upper()
        path = render_path(o.get("set_path", o["read_path"]), device.id, service)
        value = o.get("on_value", True) if state == "on" else o.get("off_value", False)
        template = o.get("set_body", None if method in ("GET", "DELETE") else {"value": "{value}"})
        body = None if template is None else render_body(template, value, device.id, service)
        await self._request(device, method, path, body, want_json=False)

    async def probe(self, device: Device) -> None:
        if path := device.options.get("probe_path"):
            await self._request(device, "GET", path, None, want_json=False)
            return
        parts = urlsplit(self._base(device))
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            async with asyncio.timeout(self._timeout(device)):
                _reader, writer = await asyncio.open_connection(parts.hostname, port)
        except (OSError, TimeoutError) as exc:
            raise UnreachableError(f"{device.id}: cannot connect to {parts.hostname}:{port}: "
                                   f"{exc or 'timeout'}") from None
        writer.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- transport -----------------------------------------------------------------------

    async def _request(self, device: Device, method: str, path: str, body: Any, want_json: bool) -> Any:
        what = f"{device.id}: {method} {path}"
        timeout = self._timeout(device)
        kwargs: dict[str, Any] = {"headers": dict(device.options.get("headers", {})),
                                  "timeout": aiohttp.ClientTimeout(total=timeout),
                                  "ssl": bool(device.options.get("verify_tls", True)),
                                  "allow_redirects": False}
        if body is not None:
            kwargs["json"] = body
        self._authenticate(device, kwargs)
        try:
            async with self._client().request(method, self._base(device) + path, **kwargs) as resp:
                text = await _bounded_text(resp, int(device.options.get("max_reply_bytes", MAX_REPLY_BYTES)), what)
                classify_status(resp.status, what, text, resp.headers.get("Location"), device.credential)
        except TimeoutError:
            raise NoAnswerError(f"{what}: timed out after {timeout:g}s") from None
        except aiohttp.ClientConnectorError as exc:
            raise UnreachableError(f"{what}: cannot connect: {clean(exc.os_error or exc, 300)}") from None
        except aiohttp.ClientError as exc:
            raise TransientError(f"{what}: {type(exc).__name__}: {clean(exc, 300)}") from None
        if not want_json:
            return None
        try:
            return json.loads(text)
        except (ValueError, RecursionError):
            raise PermanentError(f"{what}: the reply is not JSON") from None

    def _authenticate(self, device: Device, kwargs: dict[str, Any]) -> None:
        if not device.credential:
            return
        if self._context.credentials is None:
            raise ConfigError(f"{device.id}: credential {device.credential!r} named but no credential store")
        secret = self._context.credentials.get_json(device.credential)
        if isinstance(secret, dict) and "username" in secret and "password" in secret:
            pair = f"{secret['username']}:{secret['password']}".encode()
            kwargs["headers"]["Authorization"] = "Basic " + base64.b64encode(pair).decode()
        elif isinstance(secret, dict) and "token" in secret:
            kwargs["headers"]["Authorization"] = f"Bearer {secret['token']}"
        elif isinstance(secret, str):
            kwargs["headers"]["Authorization"] = f"Bearer {secret}"
        else:
            raise ConfigError(f"{device.id}: credential {device.credential!r} is neither user/password nor token")

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
        return self._session

    def _base(self, device: Device) -> str:
        address = str(device.address).rstrip("/")
        if "://" not in address:
            address = f"{device.options.get('scheme', 'http')}://{address}"
        return address

    def _timeout(self, device: Device) -> float:
        return float(device.options.get("timeout", self._context.device_timeout))
