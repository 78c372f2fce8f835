"""RouterOS, the pure part: service keys, requests, replies, plans and error mapping, for REST and the API.

No I/O here: routeros.py sends the requests this module builds and hands the replies back. Requests
are written in REST's terms; `api_words` turns one into the same command for the binary API (the
API's `?` query words are REST's `.query` words), so both protocols share every plan and state rule.
Wire facts (MikroTik's REST API help page): every value in a reply is a string ("true"/"false");
`POST /rest/<menu>/print` takes `.proplist` and `.query` (a stack of API query words, "#|" ORs the
top two); `PATCH /rest/<menu>/<.id>` sets, `PUT /rest/<menu>` adds, `DELETE /rest/<menu>/<.id>`
removes (204, no body); errors are `{"error": <status>, "message": ..., "detail": ...}`.
`.id` values ("*1A") change across reboots, so every operation looks its objects up again.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from agent.errors import AgentError, ConfigError, PermanentError, TransientError
from agent.model.device import State
from agent.text import clean

Row = dict[str, str]
LIST_MENU = "ip/firewall/address-list"
LIST6_MENU = "ipv6/firewall/address-list"
LIST_PREFIX = LIST_MENU + "/"
LIST6_PREFIX = LIST6_MENU + "/"
_ID = re.compile(r"^\*[0-9A-Fa-f]{1,16}$")
_TEXT = re.compile(r"^[^\x00-\x1f\x7f]{1,255}$")
_ADDRESS = re.compile(r"^[0-9A-Za-z.:/_-]{1,100}$")


@dataclass(frozen=True)
class Kind:
    """A RouterOS menu whose items are switched by `disabled`, and where live sessions hang off it."""

    prefix: str
    menu: str
    sessions: str | None = None   # the menu of live sessions to end on "off"
    session_key: str = "name"     # the session's field that names the item


KINDS = (Kind("ppp/secret/", "ppp/secret", "ppp/active", "name"),
         Kind("ip/hotspot/user/", "ip/hotspot/user", "ip/hotspot/active", "user"),
         Kind("interface/", "interface"),
         Kind("queue/simple/", "queue/simple"))


@dataclass(frozen=True)
class Service:
    key: str
    kind: Kind | None   # None: an address-list entry
    name: str           # the item's name, or the entry's address (canonical: as RouterOS shows it)
    list: str = ""      # the address list (address-list entries only)
    menu: str = ""      # the address-list menu: ip/firewall/address-list, or ipv6/... for an IPv6 address

    def __str__(self) -> str:
        return self.key


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    body: Any = None
    missing_ok: bool = False  # a 404 means it is gone already (a session that ended by itself)
    absent_ok: bool = False   # a print of a menu this release lacks (v6: no /ipv6/firewall/nat) reads as no items


def parse_service(key: str) -> Service:
    """A service key, checked before any I/O; PermanentError says which syntax is expected."""
    for prefix in (LIST_PREFIX, LIST6_PREFIX):
        if key.startswith(prefix):
            name, _, address = key[len(prefix):].partition("/")
            if _TEXT.match(name) and _ADDRESS.match(address):
                canonical, v6 = canonical_address(address, key)
                if prefix == LIST6_PREFIX and v6 is False:
                    raise PermanentError(f"routeros: {clean(key, 100)!r}: an IPv4 address belongs in "
                                         f"ip/firewall/address-list")
                menu = LIST6_MENU if v6 or (v6 is None and prefix == LIST6_PREFIX) else LIST_MENU
                return Service(key, None, canonical, name, menu)
    for kind in KINDS:
        if key.startswith(kind.prefix) and _TEXT.match(key[len(kind.prefix):]):
            return Service(key, kind, key[len(kind.prefix):])
    raise PermanentError(f"routeros: service key {clean(key, 100)!r} is not one of ppp/secret/<name>, "
                         f"ip/hotspot/user/<name>, interface/<name>, queue/simple/<name>, "
                         f"ip/firewall/address-list/<list>/<address>, ipv6/firewall/address-list/<list>/<address>")


def canonical_address(text: str, key: str = "") -> tuple[str, bool | None]:
    """An address-list address as RouterOS stores and prints it, and whether it is IPv6 (None: a DNS
    name, which RouterOS resolves itself). IPv4: a bare address, `/32` dropped; IPv6 lower-case and
    compressed, a bare address gets `/128`; ranges `a-b` of canonical ends. A network with host bits set
    is refused rather than guessed at. Comparing and querying in this form finds the entry the router keeps."""
    if "-" in text and not text.startswith("-") and not text.endswith("-"):
        first, _, last = text.partition("-")
        a, b = ip_or_none(first), ip_or_none(last)
        if a is not None and b is not None:
            if a.version != b.version or int(a) > int(b):
                raise PermanentError(f"routeros: {clean(key or text, 100)!r}: the range {clean(text, 60)!r} "
                                     f"must go from a lower to a higher address of one family")
            return f"{a.compressed}-{b.compressed}", a.version == 6
    try:
        net = ipaddress.ip_network(text, strict=False)
    except ValueError:
        net = None
    if net is not None and "/" in text and net.network_address != ipaddress.ip_address(text.partition("/")[0]):
        raise PermanentError(f"routeros: {clean(key or text, 100)!r}: {clean(text, 60)!r} has host bits set: write "
                             f"the network, {net.with_prefixlen}")
    if net is None:
        if any(c.isalpha() for c in text) and "." in text and ":" not in text and "/" not in text:
            return text.lower(), None  # a DNS name
        raise PermanentError(f"routeros: {clean(key or text, 100)!r}: {clean(text, 60)!r} is not an IP address, "
                             f"network, range or DNS name")
    if net.version == 4 and net.prefixlen == 32:
        return str(net.network_address), False
    return net.with_prefixlen, net.version == 6


def ip_or_none(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def same_address(row_address: str | None, canonical: str) -> bool:
    """Whether the router's printed address is `canonical` (tolerant of its other spellings)."""
    if row_address is None:
        return False
    try:
        return canonical_address(row_address)[0] == canonical
    except PermanentError:
        return row_address == canonical


# -- requests ------------------------------------------------------------------------------

def any_of(field: str, values: Sequence[str]) -> list[str]:
    """Query words matching items whose `field` equals one of `values` (one print for many)."""
    words = [f"{field}={v}" for v in values]
    return words + (["#" + "|" * (len(values) - 1)] if len(values) > 1 else [])


def any_pair(pairs: Sequence[tuple[str, str]]) -> list[str]:
    """Query words matching address-list entries whose (list, address) is one of `pairs`."""
    words = [w for lst, addr in pairs for w in (f"list={lst}", f"address={addr}", "#&")]
    return words + (["#" + "|" * (len(pairs) - 1)] if len(pairs) > 1 else [])


def print_request(menu: str, proplist: Sequence[str], query: Sequence[str], absent_ok: bool = False) -> Request:
    return Request("POST", f"/rest/{menu}/print", {".proplist": list(proplist), ".query": list(query)},
                   absent_ok=absent_ok)


def reads_for(services: Iterable[Service]) -> dict[str, Request]:
    """The prints that show the state of all `services`: one per menu, whatever their number."""
    names: dict[Kind, list[str]] = {}
    pairs: dict[str, list[tuple[str, str]]] = {}
    for s in services:
        if s.kind is None:
            if (s.list, s.name) not in pairs.setdefault(s.menu, []):
                pairs[s.menu].append((s.list, s.name))
        elif s.name not in names.setdefault(s.kind, []):
            names[s.kind].append(s.name)
    reads = {}
    for kind, items in names.items():
        reads[kind.menu] = print_request(kind.menu, [".id", "name", "disabled"], any_of("name", items))
        if kind.sessions:
            reads[kind.sessions] = print_request(kind.sessions, [".id", kind.session_key],
                                                 any_of(kind.session_key, items))
    for menu, menu_pairs in pairs.items():
        reads[menu] = print_request(menu, [".id", "list", "address", "disabled", "comment"], any_pair(menu_pairs))
    return reads


def set_disabled(menu: str, item_id: str, disabled: bool) -> Request:
    """Written `yes`/`no`, as RouterOS's own console and the clients proven on routers write it."""
    return Request("PATCH", f"/rest/{menu}/{item_id}", {"disabled": "yes" if disabled else "no"})


def remove(menu: str, item_id: str, missing_ok: bool = False) -> Request:
    return Request("DELETE", f"/rest/{menu}/{item_id}", missing_ok=missing_ok)


def api_words(req: Request) -> list[str]:
    """The API sentence (without `.tag`) that does what the REST request does:
    POST /rest/<menu>/print {.proplist, .query} -> /<menu>/print =.proplist=a,b ?word...;
    PATCH /rest/<menu>/<.id> {f: v} -> /<menu>/set =.id=<.id> =f=v; PUT /rest/<menu> {f: v} ->
    /<menu>/add =f=v; DELETE /rest/<menu>/<.id> -> /<menu>/remove =.id=<.id>; GET /rest/<menu> ->
    /<menu>/print; POST /rest/<menu>/<command> {f: v} -> /<menu>/<command> =f=v."""
    path = req.path.removeprefix("/rest/").strip("/")
    body = dict(req.body or {})
    head, _, last = path.rpartition("/")
    if req.method in ("PATCH", "DELETE"):
        if not _ID.match(last):
            raise PermanentError(f"{req.method} {path}: no .id to {'set' if req.method == 'PATCH' else 'remove'}")
        words = [f"/{head}/{'set' if req.method == 'PATCH' else 'remove'}", f"=.id={last}"]
    elif req.method == "PUT":
        words = [f"/{path}/add"]
    elif req.method == "GET":
        words = [f"/{path}/print"]
    else:
        words = [f"/{path}"]
    proplist = body.pop(".proplist", None)
    query = body.pop(".query", [])
    if proplist:
        words.append("=.proplist=" + (proplist if isinstance(proplist, str) else ",".join(proplist)))
    words += [f"={k}={v}" for k, v in body.items()]
    return words + [f"?{w}" for w in query]


# -- replies -------------------------------------------------------------------------------

def parse_rows(doc: Any, what: str) -> list[Row]:
    """A print reply: a list of objects whose values are all strings, with a sane `.id`."""
    if not isinstance(doc, list) or not all(isinstance(r, dict) for r in doc):
        raise PermanentError(f"{what}: expected a list of objects, got {clean(json.dumps(doc), 200)}")
    for row in doc:
        bad = [k for k, v in row.items() if not isinstance(k, str) or not isinstance(v, str)]
        if bad or (".id" in row and not _ID.match(row[".id"])):
            raise PermanentError(f"{what}: malformed item in the reply: {clean(json.dumps(row), 200)}")
    return doc


def is_disabled(row: Row, what: str) -> bool:
    value = row.get("disabled", "false")
    if value in ("true", "yes"):
        return True
    if value in ("false", "no"):
        return False
    raise PermanentError(f"{what}: disabled={clean(value, 50)!r} is neither true nor false")


def item(service: Service, replies: Mapping[str, list[Row]]) -> Row:
    """The one item a service names; a missing or ambiguous item is a permanent error."""
    assert service.kind is not None
    rows = [r for r in replies[service.kind.menu] if r.get("name") == service.name]
    if not rows:
        raise PermanentError(f"{service}: no {service.kind.menu} item named {clean(service.name, 100)!r} "
                             f"on the router")
    if len(rows) > 1 or ".id" not in rows[0]:
        raise PermanentError(f"{service}: {len(rows)} items named {clean(service.name, 100)!r} without a "
                             f"usable .id: refusing to guess")
    return rows[0]


def sessions(service: Service, replies: Mapping[str, list[Row]]) -> list[Row]:
    kind = service.kind
    if kind is None or kind.sessions is None:
        return []
    return [r for r in replies[kind.sessions] if r.get(kind.session_key) == service.name and ".id" in r]


def entries(service: Service, replies: Mapping[str, list[Row]]) -> list[Row]:
    return [r for r in replies[service.menu]
            if r.get("list") == service.list and same_address(r.get("address"), service.name) and ".id" in r]


def state_of(service: Service, replies: Mapping[str, list[Row]]) -> State:
    """On/off as the router has it. A disabled secret whose session is still up is "on": the
    customer is online, and applying "off" again ends the session."""
    if service.kind is None:
        return "off" if any(not is_disabled(e, str(service)) for e in entries(service, replies)) else "on"
    row = item(service, replies)
    return "on" if not is_disabled(row, str(service)) or sessions(service, replies) else "off"


def plan(service: Service, replies: Mapping[str, list[Row]], state: State,
         comment: str, manage_foreign: bool) -> list[Request]:
    """The writes that put `service` into `state`, given what the router has now (may be none)."""
    if service.kind is None:
        return plan_entry(service, entries(service, replies), state, comment, manage_foreign)
    kind, row = service.kind, item(service, replies)
    disabled = is_disabled(row, str(service))
    if state == "on":
        return [set_disabled(kind.menu, row[".id"], False)] if disabled else []
    writes = [] if disabled else [set_disabled(kind.menu, row[".id"], True)]
    return writes + [remove(kind.sessions, s[".id"], missing_ok=True)
                     for s in sessions(service, replies) if kind.sessions]


def plan_entry(service: Service, found: list[Row], state: State, comment: str, manage_foreign: bool) -> list[Request]:
    """Address lists: off adds an entry marked with `comment`; on removes the marked ones (and,
    only with manage_foreign_entries, the operator's own enabled entries).

    RouterOS refuses a second entry for the same list and address even when the first is disabled
    ("already have such entry"). So when only the operator's own *disabled* entry is there, off
    enables it and appends ` [<comment>]` to its comment, and on disables it again and gives its
    comment back: the entry is borrowed, not taken."""
    menu = service.menu
    mark = f"[{comment}]"
    ours = [e for e in found if e.get("comment") == comment]
    borrowed = [e for e in found if e not in ours and e.get("comment", "").endswith(mark)]
    enabled = [e for e in found if not is_disabled(e, str(service))]
    if state == "off":
        if enabled:
            return []
        if ours:
            return [set_disabled(menu, ours[0][".id"], False)]
        if found:
            lent = borrowed[0] if borrowed else found[0]
            note = lent.get("comment", "") if lent in borrowed else f"{lent.get('comment', '')} {mark}".strip()
            return [Request("PATCH", f"/rest/{menu}/{lent['.id']}", {"disabled": "no", "comment": note})]
        return [Request("PUT", f"/rest/{menu}", {"list": service.list, "address": service.name, "comment": comment})]
    foreign = [e for e in enabled if e not in ours and e not in borrowed]
    if foreign and not manage_foreign:
        raise PermanentError(f"{service}: {len(foreign)} enabled entr{'y' if len(foreign) == 1 else 'ies'} not "
                             f"added by the agent (comment {clean(foreign[0].get('comment', ''), 80)!r}); "
                             f"set manage_foreign_entries=true to let the agent remove them")
    give_back = [Request("PATCH", f"/rest/{menu}/{e['.id']}",
                         {"disabled": "yes", "comment": e.get("comment", "")[:-len(mark)].rstrip()})
                 for e in borrowed]
    return [remove(menu, e[".id"]) for e in ours + foreign] + give_back


# -- does a suspension through an address list block anyone? ----------------------------------

RULES = {LIST_MENU: ("ip/firewall/filter", "ip/firewall/nat", "ip/firewall/mangle", "ip/firewall/raw"),
         LIST6_MENU: ("ipv6/firewall/filter", "ipv6/firewall/nat", "ipv6/firewall/mangle", "ipv6/firewall/raw")}
SINCE_V7 = {"ipv6/firewall/nat"}  # RouterOS v6 has no IPv6 NAT: its print is "no such command prefix"


def policy_lists(services: Iterable[str], option_lists: Iterable[str]) -> list[tuple[str, str]]:
    """(address-list menu, list) for every list the known services use and the `address_lists` option
    names (IPv4 lists), in order, once each. Keys that are not address-list services are passed over."""
    out: list[tuple[str, str]] = []
    for key in services:
        try:
            svc = parse_service(key)
        except PermanentError:
            continue
        if svc.kind is None and (svc.menu, svc.list) not in out:
            out.append((svc.menu, svc.list))
    for name in option_lists:
        if (LIST_MENU, name) not in out:
            out.append((LIST_MENU, name))
    return out


def policy_reads(lists: Iterable[tuple[str, str]]) -> dict[str, Request]:
    """The prints of every firewall rule table that could use the lists (IPv4 and/or IPv6)."""
    menus = {menu for menu, _ in lists}
    return {table: print_request(table, ["src-address-list", "dst-address-list", "disabled"], [], table in SINCE_V7)
            for menu in (LIST_MENU, LIST6_MENU) if menu in menus for table in RULES[menu]}


def unused_lists(lists: Iterable[tuple[str, str]], replies: Mapping[str, list[Row]]) -> list[str]:
    """One sentence per list that no enabled rule (filter, nat, mangle, raw; source or destination,
    negated or not) uses: a suspension through such a list blocks nobody."""
    problems = []
    for menu, name in lists:
        used = {r.get(field, "").removeprefix("!") for table in RULES[menu] for r in replies.get(table, [])
                if not is_disabled(r, table) for field in ("src-address-list", "dst-address-list")}
        if name not in used:
            family = "ipv6" if menu == LIST6_MENU else "ip"
            problems.append(f"address list {clean(name, 100)!r} is used by no enabled /{family}/firewall rule "
                            f"(filter, nat, mangle or raw; src-address-list or dst-address-list): a suspension "
                            f"through it blocks nobody. Add one, e.g. `/{family} firewall filter add chain=forward "
                            f"src-address-list={clean(name, 100)} action=drop`")
    return problems


# -- the agent's own way in ----------------------------------------------------------------

def lifeline_reads(name: str, version: int) -> dict[str, Request]:
    """The prints that show which interfaces go down with interface `name` and which addresses they hold."""
    addresses = "ip/address" if version == 4 else "ipv6/address"
    return {addresses: print_request(addresses, ["address", "interface"], []),
            "interface/bridge/port": print_request("interface/bridge/port", ["interface", "bridge"], []),
            "interface/vlan": print_request("interface/vlan", ["name", "interface"], [])}


def cuts_off(service: Service, host: ipaddress.IPv4Address | ipaddress.IPv6Address,
             replies: Mapping[str, list[Row]]) -> PermanentError | None:
    """Whether disabling `service`'s interface takes down the address the agent reaches the router at:
    the interface itself, the bridge it is a port of, or a VLAN on either holds that address."""
    down = {service.name} | {r.get("bridge", "") for r in replies["interface/bridge/port"]
                             if r.get("interface") == service.name}
    down |= {r.get("name", "") for r in replies["interface/vlan"] if r.get("interface") in down}
    addresses = replies["ip/address" if host.version == 4 else "ipv6/address"]
    for row in addresses:
        try:
            held = ipaddress.ip_interface(row.get("address", "")).ip
        except ValueError:
            continue
        if held == host and row.get("interface") in down:
            via = row.get("interface")
            return PermanentError(f"{service}: would cut the agent off from the router: it reaches the router at "
                                  f"{host}, which is on {clean(via, 60)!r}"
                                  + ("" if via == service.name else f" (carried by {clean(service.name, 60)!r})")
                                  + ": disable it from another way in, or reach the router at another address")
    return None


# -- errors --------------------------------------------------------------------------------

def loads(body: bytes) -> Any:
    """RouterOS's JSON as it really comes: raw control bytes inside strings and text that is not
    UTF-8 (a comment typed in another encoding) are taken, decoded with replacement; the values are
    escaped wherever they are shown. ValueError when it is not JSON at all."""
    return json.loads(body.decode("utf-8", "replace"), strict=False)


def error_text(body: bytes) -> str:
    """The router's `message: detail`, escaped and bounded; the raw text when it is not its JSON."""
    try:
        doc = loads(body)
    except ValueError:
        return clean(body.decode("utf-8", "replace").strip(), 200)
    if isinstance(doc, dict) and "message" in doc:
        detail = doc.get("detail")
        return clean(f"{doc['message']}" + (f": {detail}" if detail else ""), 200)
    return clean(json.dumps(doc), 200)


def no_rest_api(status: int, body: bytes) -> bool:
    """A web server that is not RouterOS REST: WebFig's HTML, or a 404 without REST's JSON error
    (RouterOS v6 has no /rest; a v7 router's /rest always answers JSON)."""
    text = body.lstrip()[:1]
    return (status < 300 and text == b"<") or (status == 404 and text != b"{")


def classify(status: int, body: bytes, what: str, login: str, location: str | None = None) -> AgentError | None:
    """The error an HTTP status from RouterOS means (None for success). `login` names the user and
    the credential file, never the password."""
    if status < 300:
        return None
    if status < 400:
        return PermanentError(f"{what}: HTTP {status} redirect to {clean(location or '(no Location)', 200)!r} "
                              f"not followed: point the device address at the router's REST service")
    text = error_text(body)
    if status == 401:
        return ConfigError(f"{what}: HTTP 401: the router refused {login}: {REFUSED_LOGIN}")
    if status == 403:
        return ConfigError(f"{what}: HTTP 403 for {login}: give the user's group the rest-api, read and "
                           f"write policies ({text})")
    if status >= 500 or status in (408, 425, 429) or "Session closed" in text:
        return TransientError(f"{what}: HTTP {status}: {text}")
    if status == 404:
        return PermanentError(f"{what}: not found on the router (HTTP 404: {text})")
    return PermanentError(f"{what}: HTTP {status}: {text}")


REFUSED_LOGIN = ("check the password in that credential file, the user name, and the user's allowed addresses "
                 "(`/user print` column ADDRESS; RouterOS refuses a login from anywhere else with the same "
                 "message)")


def is_missing(message: str) -> bool:
    """An API `!trap` that says the item is gone (an `.id` that no longer exists)."""
    return "no such item" in message


def is_absent(message: str) -> bool:
    """An API `!trap` or a REST error detail that says the router has no such menu or command."""
    return "no such command" in message


def login_error(message: str, what: str, login: str) -> AgentError:
    """A `!trap` to `/login`: the router refused the user (or its group lacks the `api` policy)."""
    text = clean(message, 200)
    if "permission" in message:
        return ConfigError(f"{what}: the router refused {login}: give the user's group the api, read and write "
                           f"policies ({text})")
    return ConfigError(f"{what}: the router refused {login} ({text}): {REFUSED_LOGIN}; the user's group needs "
                       f"the api policy")


def trap_error(message: str, category: str | None, what: str) -> AgentError:
    """The error an API `!trap` means. Categories (API documentation): 0 missing item or command,
    1 bad argument value, 2 command interrupted, 3 scripting failure, 4 general failure, 5 API failure."""
    text = clean(message, 200)
    if "not enough permissions" in message:
        return ConfigError(f"{what}: {text}: give the user's group the api, read and write policies")
    if category == "2" or "interrupted" in message:
        return TransientError(f"{what}: the router interrupted the command: {text}")
    if is_missing(message):
        return PermanentError(f"{what}: not found on the router ({text})")
    return PermanentError(f"{what}: the router refused it: {text}")
