"""A fake MikroTik RouterOS v7 REST service, written from MikroTik's REST API help page
(help.mikrotik.com, "REST API") and its API page (query words). It is NOT a router: tests that use
it are marked `fake_backed`.

What it follows from the documentation:
  - HTTP Basic auth; a wrong user or password answers 401.
  - Every value in a reply is a string ("disabled": "false"); `.id` looks like "*1A".
  - GET /rest/<menu> lists items (query parameters filter by equality, `.proplist=a,b` selects
    fields); GET /rest/<menu>/<.id or name> returns one object or 404.
  - POST /rest/<menu>/print takes `.proplist` (a list or a comma-separated string) and `.query`
    (API query words on a stack: `name=x`, `=name=x`, `name`, `-name`, `#` operations `! & | .` and
    indexes); POST /rest/<menu>/remove {".id"} answers [].
  - PATCH /rest/<menu>/<.id> sets fields and answers the whole object; PUT /rest/<menu> adds and
    answers the new object; DELETE /rest/<menu>/<.id> answers 204 without a body, 404 the second time.
  - Errors are {"error": <status>, "message": <reason>, "detail": ...}: 404 "Not Found", 400 "Bad
    Request" for unknown parameters or directories, 406 "Not Acceptable" with "no such command or
    directory (remove)" for a command a menu does not have (e.g. DELETE on /interface).
  - Disabling a PPP secret or hotspot user does not end its live session in /ppp/active or
    /ip/hotspot/active.
  - reboot() renumbers every `.id` (and drops live sessions, as a real reboot does).
  - address lists (/ip and /ipv6 firewall address-list) keep addresses in canonical form (IPv4 without
    `/32`, IPv6 compressed, lower-case, `/128` on a bare address) and refuse a second entry for the
    same list and address, even beside a disabled one: "failure: already have such entry".
  - /ipv6/firewall/nat exists from RouterOS 7.1 (`has_menu`; the API fake answers a v6 `version`
    "no such command prefix" for it).
Guesses, not documented: the exact detail texts; whether an unknown directory is 400 or 406.

Test knobs (plain Python, not REST): add(), connect(), find(), reboot(), `inject` (canned replies,
each served once to the next request with its method), `delay` (seconds before answering), `drop` (close the
connection of the next N requests without answering), `requests` (what was asked).
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import hashlib
import ipaddress
import json
import re
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

Row = dict[str, str]
READ_ONLY = {".id", "dynamic", "running", "uptime", "creation-time", "actual-interface"}
# menu -> (commands it has, default fields of a new item)
MENUS: dict[str, tuple[set[str], Row]] = {
    "ppp/secret": ({"add", "set", "remove"},
                   {"name": "", "password": "", "service": "any", "profile": "default", "disabled": "false",
                    "comment": ""}),
    "ppp/active": ({"remove"}, {"name": "", "service": "pppoe", "caller-id": "", "address": "",
                                "uptime": "1h2m3s", "encoding": "", "session-id": "0x81000001", "radius": "false"}),
    "ip/hotspot/user": ({"add", "set", "remove"},
                        {"name": "", "password": "", "server": "all", "profile": "default", "disabled": "false",
                         "comment": ""}),
    "ip/hotspot/active": ({"remove"}, {"user": "", "server": "hotspot1", "address": "", "mac-address": "",
                                       "uptime": "5m", "login-by": "http-chap"}),
    "interface": ({"set"}, {"name": "", "type": "ether", "mtu": "1500", "running": "true", "disabled": "false",
                            "comment": ""}),
    "queue/simple": ({"add", "set", "remove"}, {"name": "", "target": "", "max-limit": "10M/10M",
                                                "disabled": "false", "comment": ""}),
    "ip/firewall/address-list": ({"add", "set", "remove"},
                                 {"list": "", "address": "", "disabled": "false", "dynamic": "false",
                                  "creation-time": "2026-01-01 00:00:00", "comment": ""}),
    "ipv6/firewall/address-list": ({"add", "set", "remove"},
                                   {"list": "", "address": "", "disabled": "false", "dynamic": "false",
                                    "creation-time": "2026-01-01 00:00:00", "comment": ""}),
    "ip/address": ({"add", "set", "remove"}, {"address": "", "network": "", "interface": "", "disabled": "false",
                                               "comment": ""}),
    "ipv6/address": ({"add", "set", "remove"}, {"address": "", "interface": "", "disabled": "false",
                                                 "comment": ""}),
    "interface/bridge/port": ({"add", "set", "remove"}, {"interface": "", "bridge": "", "disabled": "false",
                                                         "comment": ""}),
    "interface/vlan": ({"add", "set", "remove"}, {"name": "", "vlan-id": "1", "interface": "", "disabled": "false",
                                                  "comment": ""}),
}
for _table in ("ip/firewall/filter", "ip/firewall/nat", "ip/firewall/mangle", "ip/firewall/raw",
               "ipv6/firewall/filter", "ipv6/firewall/nat", "ipv6/firewall/mangle", "ipv6/firewall/raw"):
    MENUS[_table] = ({"add", "set", "remove"}, {"chain": "forward", "action": "accept", "src-address-list": "",
                                                "dst-address-list": "", "disabled": "false", "comment": ""})
ADDRESS_LISTS = ("ip/firewall/address-list", "ipv6/firewall/address-list")
SINCE_V7 = {"ipv6/firewall/nat"}  # menus RouterOS v6 does not have (IPv6 NAT came with 7.1)


def stored_address(menu: str, text: str) -> str:
    """What RouterOS keeps for an address-list address: IPv4 without `/32`, IPv6 compressed and
    lower-case with `/128` on a bare address; an IPv6 address refused in the IPv4 menu and back."""
    try:
        net = ipaddress.ip_network(text)
    except ValueError:
        return text  # a range or a DNS name: kept as written in this fake
    if (net.version == 6) != (menu == "ipv6/firewall/address-list"):
        raise BadRequest(400, f"failure: {text} is not a valid dns name")
    return str(net.network_address) if net.version == 4 and net.prefixlen == 32 else net.with_prefixlen


class BadRequest(Exception):
    def __init__(self, status: int, detail: str | None = None) -> None:
        super().__init__(detail)
        self.status, self.detail = status, detail


def error(status: int, detail: str | None = None) -> web.Response:
    doc: dict[str, Any] = {"error": status, "message": {400: "Bad Request", 401: "Unauthorized",
                                                        404: "Not Found", 406: "Not Acceptable"}.get(status, "Error")}
    if detail:
        doc["detail"] = detail
    return web.json_response(doc, status=status)


def shown(row: Row, proplist: list[str] | None) -> Row:
    """What a reply shows: empty fields are left out (as `print` does), `.proplist` selects."""
    visible = {k: v for k, v in row.items() if v != "" or k in ("name", "user")}
    return visible if proplist is None else {k: v for k, v in visible.items() if k in proplist}


def matches(row: Row, words: list[str]) -> bool:
    """Evaluate API query words on a stack that starts with endless 'true' values."""
    stack: list[bool] = []

    def pop() -> bool:
        return stack.pop() if stack else True

    for word in words:
        if word.startswith("#"):
            operate(stack, word[1:], pop)
        elif word.startswith("-"):
            stack.append(word[1:] not in row)
        elif "=" in word:
            name, _, value = word.removeprefix("=").partition("=")
            stack.append(row.get(name) == value)
        elif word and word[0] not in "<>":
            stack.append(word in row)
        else:
            raise BadRequest(400, f"unsupported query word {word!r} in this fake")
    return all(stack)


def one_of(words: list[str]) -> tuple[str, set[str]] | None:
    """(field, values) when `words` are exactly `f=v1 ... f=vN #|...|` (one field equal to any of N values,
    as a driver asks for many items at once), evaluated as a set lookup: the stack machine would cost
    N steps a row, and a router with thousands of customers is asked for thousands of them."""
    if len(words) < 3 or words[-1] != "#" + "|" * (len(words) - 2):
        return None
    pairs = [w.removeprefix("=").partition("=") for w in words[:-1]]
    fields = {name for name, eq, _ in pairs}
    if len(fields) != 1 or any(not eq or not name or name[0] in "#-<>" for name, eq, _ in pairs):
        return None
    return fields.pop(), {value for _, _, value in pairs}


def operate(stack: list[bool], ops: str, pop: Any) -> None:
    i = 0
    while i < len(ops):
        if ops[i].isdigit():
            j = i
            while j < len(ops) and ops[j].isdigit():
                j += 1
            index = int(ops[i:j])
            value = stack[-1 - index] if index < len(stack) else True
            if j == len(ops):
                stack[:] = [value]
                return
            stack.append(value)
            i = j + 1 if ops[j] == "." else j
            continue
        op = ops[i]
        if op == "!":
            stack.append(not pop())
        elif op in "&|":
            a, b = pop(), pop()
            stack.append(a and b if op == "&" else a or b)
        elif op == ".":
            top = pop()
            stack += [top, top]
        else:
            raise BadRequest(400, f"bad query operation {op!r}")
        i += 1


@dataclass
class Cert:
    cert: Path
    key: Path
    sha256: str  # hex, colon-separated, as openssl prints it

    def context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.cert, self.key)
        return ctx


def self_signed(directory: Path, name: str = "router", host: str | None = "127.0.0.1") -> Cert:
    """A throwaway self-signed certificate for `host`, as RouterOS makes for www-ssl. With host=None it
    carries only its common name, `name` (no subject alternative names), as RouterOS's usual ones do."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True))
    if host is not None:
        cert = cert.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(host))]),
                                  critical=False)
    signed = cert.sign(key, hashes.SHA256())
    paths = Cert(directory / f"{name}.crt", directory / f"{name}.key",
                 hashlib.sha256(signed.public_bytes(serialization.Encoding.DER)).hexdigest())
    paths.cert.write_bytes(signed.public_bytes(serialization.Encoding.PEM))
    paths.key.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption()))
    paths.sha256 = ":".join(paths.sha256[i:i + 2] for i in range(0, 64, 2)).upper()
    return paths


class RouterOsFake:
    def __init__(self, username: str, password: str) -> None:
        self.tables: dict[str, list[Row]] = {menu: [] for menu in MENUS}
        self.requests: list[tuple[str, str, Any]] = []
        self.peers: list[tuple[str, int]] = []  # the client end of each request's connection
        self.inject: list[tuple[str, web.Response]] = []  # (method or "*", canned reply)
        self.delay = 0.0
        self.drop = 0  # the next `drop` requests get their connection closed without an answer
        self.boots = 0
        self.version = "7.16 (stable)"
        self.username, self.password = username, password
        self.on_reboot: list[Any] = []  # callables run by reboot() (the API fake drops its connections)
        self._next = 1
        self._auth = "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()
        self.app = web.Application()
        self.app.router.add_route("*", "/rest/{tail:.*}", self._handle)
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self, tls: Cert | None = None, host: str = "127.0.0.1") -> RouterOsFake:
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, 0, ssl_context=tls.context() if tls else None)
        await site.start()
        self.url = f"{'https' if tls else 'http'}://{host}:{self._runner.addresses[0][1]}"
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    # -- test knobs ----------------------------------------------------------------------

    def add(self, menu: str, **fields: str) -> Row:
        row = {".id": self._new_id(), **MENUS[menu][1]}
        row.update({k.replace("_", "-"): str(v) for k, v in fields.items()})
        self.tables[menu].append(row)
        return row

    def connect(self, name: str, menu: str = "ppp/active") -> Row:
        """A customer's live session (it stays up when the secret is disabled, as on RouterOS)."""
        return self.add(menu, **({"user": name} if menu == "ip/hotspot/active" else {"name": name}),
                        address=f"10.64.0.{len(self.tables[menu]) + 2}")

    def has_menu(self, menu: str) -> bool:
        """Whether this router's release has the menu (v6 lacks those in SINCE_V7; only the API reaches v6)."""
        major = re.match(r"\d+", self.version)
        return menu in MENUS and (menu not in SINCE_V7 or major is None or int(major.group()) >= 7)

    def find(self, menu: str, **fields: str) -> list[Row]:
        want = {k.replace("_", "-"): v for k, v in fields.items()}
        return [r for r in self.tables[menu] if all(r.get(k) == v for k, v in want.items())]

    def reboot(self) -> None:
        """Every `.id` changes; live sessions end."""
        self.boots += 1
        self._next += 0x100
        for menu, rows in self.tables.items():
            if menu.endswith("/active"):
                rows.clear()
            for row in rows:
                row[".id"] = self._new_id()
        for hook in self.on_reboot:
            hook()

    def _new_id(self) -> str:
        self._next += 1
        return f"*{self._next:X}"

    # -- REST ----------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json() if request.can_read_body else None
        self.requests.append((request.method, request.path, body))
        self.peers.append(request.transport.get_extra_info("peername") if request.transport else ("?", 0))
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.drop:  # the connection closes without an answer, as RouterOS may do to a reused one
            self.drop -= 1
            if request.transport is not None:
                request.transport.close()
            return web.Response(status=500)
        if request.headers.get("Authorization") != self._auth:
            return error(401)
        for i, (method, canned) in enumerate(self.inject):
            if method in ("*", request.method):
                del self.inject[i]
                return canned
        try:
            return self._dispatch(request.method, request.match_info["tail"].strip("/"), body, request)
        except BadRequest as exc:
            return error(exc.status, exc.detail)

    def _dispatch(self, method: str, tail: str, body: Any, request: web.Request) -> web.StreamResponse:
        if tail in ("system/identity", "system/resource"):
            return web.json_response({"name": "MikroTik"} if tail.endswith("identity") else
                                     {"version": self.version, "uptime": f"{self.boots}m", "platform": "MikroTik"})
        menu, _, last = tail.rpartition("/")
        if method in ("GET", "PUT") and tail in MENUS:
            return self._list(request) if method == "GET" else self._add(tail, body)
        if method == "POST" and menu in MENUS:
            return self._command(menu, last, body)
        if menu not in MENUS:
            raise BadRequest(400, f"no such command or directory ({tail.split('/')[0]})")
        if method == "GET":
            return web.json_response(self._item(menu, last))
        if method == "PATCH":
            return self._set(menu, last, body)
        if method == "DELETE":
            self._remove(menu, last)
            return web.Response(status=204)
        raise BadRequest(400, f"method {method} not supported")

    def _list(self, request: web.Request) -> web.Response:
        query = dict(request.query)
        proplist = query.pop(".proplist").split(",") if ".proplist" in query else None
        rows = [r for r in self.tables[request.match_info["tail"].strip("/")]
                if all(r.get(k) == v for k, v in query.items())]
        return web.json_response([shown(r, proplist) for r in rows])

    def _command(self, menu: str, command: str, body: Any) -> web.Response:
        body = body or {}
        if command == "print":
            proplist = body.get(".proplist")
            if isinstance(proplist, str):
                proplist = proplist.split(",")
            words = list(body.get(".query", []))
            if (any_of := one_of(words)) is not None:
                rows = [r for r in self.tables[menu] if r.get(any_of[0]) in any_of[1]]
            else:
                rows = [r for r in self.tables[menu] if matches(r, words)]
            return web.json_response([shown(r, proplist) for r in rows])
        if command == "remove" and "remove" in MENUS[menu][0]:
            self._remove(menu, str(body.get(".id", "")))
            return web.json_response([])
        raise BadRequest(406, f"no such command or directory ({command})")

    def _item(self, menu: str, key: str) -> Row:
        for row in self.tables[menu]:
            if key in (row[".id"], row.get("name")):
                return row
        raise BadRequest(404)

    def _set(self, menu: str, key: str, body: Any) -> web.Response:
        return web.json_response(shown(self.set_item(menu, key, body), None))

    def _add(self, menu: str, body: Any) -> web.Response:
        return web.json_response(shown(self.add_item(menu, body), None))

    # -- the model both protocols share (BadRequest says what went wrong) ---------------------

    def set_item(self, menu: str, key: str, body: Any) -> Row:
        if "set" not in MENUS[menu][0]:
            raise BadRequest(406, "no such command or directory (set)")
        row = self._item(menu, key)
        row.update(self._fields(menu, body))
        if menu == "interface":
            row["running"] = "false" if row["disabled"] == "true" else "true"
        return row

    def add_item(self, menu: str, body: Any) -> Row:
        if "add" not in MENUS[menu][0]:
            raise BadRequest(406, "no such command or directory (add)")
        fields = self._fields(menu, body)
        required = ("list", "address") if menu in ADDRESS_LISTS else ("name",)
        if missing := [f for f in required if not fields.get(f)]:
            raise BadRequest(400, f"missing value(s) of argument(s) {' '.join(missing)}")
        if menu in ADDRESS_LISTS:
            fields["address"] = stored_address(menu, fields["address"])
            if self.find(menu, list=fields["list"], address=fields["address"]):  # disabled ones count too
                raise BadRequest(400, "failure: already have such entry")
        return self.add(menu, **fields)

    def remove_item(self, menu: str, key: str) -> None:
        self._remove(menu, key)

    def _remove(self, menu: str, key: str) -> None:
        if "remove" not in MENUS[menu][0]:
            raise BadRequest(406, "no such command or directory (remove)")
        self.tables[menu].remove(self._item(menu, key))

    def _fields(self, menu: str, body: Any) -> Row:
        if not isinstance(body, dict):
            raise BadRequest(400, "expected a JSON object")
        fields: Row = {}
        for key, value in body.items():
            if key not in MENUS[menu][1] or key in READ_ONLY:
                raise BadRequest(400, f"unknown parameter {key}")
            text = json.dumps(value) if not isinstance(value, str) else value
            if key == "disabled":
                if text not in ("yes", "no", "true", "false"):
                    raise BadRequest(400, "value of disabled must be yes or no")
                text = "true" if text in ("yes", "true") else "false"
            fields[key] = text
        return fields
