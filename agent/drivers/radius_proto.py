"""The pure parts of the `radius` driver: options, service keys, what the policy store's rows mean,
and what a Dynamic Authorization (RFC 5176) reply means. Nothing here does I/O or imports pyrad.

A subscriber is off when the `suspended_group` row wins in FreeRADIUS's group order (rlm_sql reads
`radusergroup` ORDER BY priority, lowest number first, and a matching group ends the walk unless it
says Fall-Through) and, where accounting is in the same store, no session of the user is open on
this NAS any more.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from agent.errors import ConfigError, PermanentError, TransientError
from agent.model.device import State
from agent.text import clean

DEFAULT_PORT = 3799                  # RFC 5176; MikroTik `/radius incoming`; some deployments use 1700
PROBE_USER = "pgmq-edge-agent-probe"  # a user no NAS has a session for: the probe expects NAK 503
MAX_USER = 253                       # a RADIUS attribute holds at most 253 octets
MAX_SESSIONS = 20                    # open sessions of one user on one NAS that one take ends
SUSPEND_MODES = ("disconnect", "coa")
RESTORE_MODES = ("disconnect", "coa", "none")

DISCONNECT_REQUEST, DISCONNECT_ACK, DISCONNECT_NAK = 40, 41, 42
COA_REQUEST, COA_ACK, COA_NAK = 43, 44, 45
ACKS = {DISCONNECT_ACK, COA_ACK}
NAKS = {DISCONNECT_NAK, COA_NAK}

SESSION_NOT_FOUND = 503
# RFC 5176 section 3.5 Error-Cause values, with what the operator can do about each.
ERROR_CAUSES = {
    401: ("Unsupported-Attribute", "the NAS does not take one of the attributes sent (check coa_attributes)"),
    402: ("Missing-Attribute", "the NAS wants another attribute to find the session"),
    403: ("NAS-Identification-Mismatch", "set the nas_ip option to the NAS-IP-Address the NAS uses"),
    404: ("Invalid-Request", "the NAS refused the request's form"),
    405: ("Unsupported-Service", "the NAS does not support this request (e.g. CoA): use suspend=disconnect"),
    406: ("Unsupported-Extension", "the NAS does not support Dynamic Authorization: enable it on the NAS"),
    407: ("Invalid-Attribute-Value", "the NAS refused an attribute's value (check coa_attributes)"),
    501: ("Administratively-Prohibited", "the NAS is set up to refuse these requests from this host"),
    502: ("Request-Not-Routable", "a proxy on the way cannot route the request"),
    504: ("Session-Context-Not-Removable", "the NAS will not end this session"),
    505: ("Other-Proxy-Processing-Error", ""),
    506: ("Resources-Unavailable", ""),
    507: ("Request-Initiated", ""),
    508: ("Multiple-Session-Selection-Unsupported", "the NAS needs one session named exactly"),
}
TRANSIENT_CAUSES = {505, 506, 507}

_USER_KEY = re.compile(r"^user/(.+)$", re.DOTALL)
_UNSAFE = re.compile("[\x00-\x1f\x7f]")
_GROUP = re.compile(r"^[A-Za-z0-9_.:@+-]{1,64}$")
_CREDENTIAL = re.compile(r"^[A-Za-z0-9_.@+-]{1,128}$")

Attributes = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Options:
    policy_credential: str
    suspended_group: str
    nas_ip: str
    suspend: str
    coa_attributes: Attributes
    restore: str
    restore_coa_attributes: Attributes
    timeout: float               # seconds for one operation: the store's queries and every UDP try
    retries: int                 # resends of an unanswered request; each try waits a share of the time left
    accounting: bool
    settle: float                # seconds to wait for the NAS's Accounting-Stop after a Disconnect-ACK


@dataclass(frozen=True)
class Session:
    """An open `radacct` row of the user on this NAS: what names the session to the NAS."""

    radacct_id: int
    acct_session_id: str
    framed_ip: str | None


@dataclass(frozen=True)
class Policy:
    """What the store holds for one user: whether it is known, its groups, its open sessions here."""

    user: str
    known: bool
    groups: tuple[tuple[str, int], ...]   # (groupname, priority)
    sessions: tuple[Session, ...] = ()


def parse_service(key: object) -> str:
    """`user/<name>` -> the User-Name; PermanentError before any I/O."""
    m = _USER_KEY.match(key) if isinstance(key, str) else None
    if m is None:
        raise PermanentError(f"radius: service key {clean(key, 100)!r} is not user/<username>")
    name = m.group(1)
    if len(name.encode()) > MAX_USER or _UNSAFE.search(name):
        raise PermanentError(f"radius: {clean(key, 100)!r}: a user name is 1-{MAX_USER} octets without "
                             f"control characters")
    return name


def parse_address(address: str | None) -> tuple[str, int]:
    """The NAS's Dynamic Authorization Server: host[:port] (UDP 3799 by default), [v6]:port."""
    if not address or not isinstance(address, str) or "://" in address or "/" in address:
        raise ConfigError(f"radius: the device needs an address host[:port] (the NAS's Dynamic Authorization "
                          f"Server, UDP {DEFAULT_PORT} by default)")
    host, port = address, str(DEFAULT_PORT)
    if address.startswith("["):
        host, _, tail = address[1:].partition("]")
        if tail:
            if not tail.startswith(":"):
                raise ConfigError(f"radius: address {clean(address, 100)!r} is not [host]:port")
            port = tail[1:]
    elif address.count(":") == 1:
        host, port = address.split(":")
    if not host or not port.isascii() or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConfigError(f"radius: address {clean(address, 100)!r} is not host[:port] with a port 1-65535")
    return host, int(port)


def parse_options(options: dict[str, object], address: str | None, default_timeout: float) -> Options:
    """Check and normalise the device's options; ConfigError names the bad one."""
    cred = options.get("policy_credential")
    if not isinstance(cred, str) or not _CREDENTIAL.match(cred) or cred.startswith("."):
        raise ConfigError("radius: the option policy_credential must name the credential file that holds the "
                          "DSN of the RADIUS SQL database")
    group = options.get("suspended_group", "suspended")
    if not isinstance(group, str) or not _GROUP.match(group):
        raise ConfigError("radius: suspended_group must be a group name of 1-64 letters, digits or _.:@+-")
    suspend = _choice(options, "suspend", SUSPEND_MODES)
    restore = _choice(options, "restore", RESTORE_MODES)
    coa = _attributes(options.get("coa_attributes"), "coa_attributes", suspend == "coa")
    restore_coa = _attributes(options.get("restore_coa_attributes"), "restore_coa_attributes", restore == "coa")
    accounting = options.get("accounting", True)
    if not isinstance(accounting, bool):
        raise ConfigError("radius: accounting must be true or false (whether radacct in the store is kept by "
                          "this NAS)")
    return Options(cred, group, _nas_ip(options.get("nas_ip"), address), suspend, coa, restore, restore_coa,
                   _number(options.get("timeout", default_timeout), "timeout", float),
                   int(_number(options.get("retries", 2), "retries", int, allow_zero=True, top=10)),
                   accounting, _number(options.get("settle", 3.0), "settle", float, allow_zero=True))


def _choice(options: dict[str, object], name: str, allowed: tuple[str, ...]) -> str:
    value = options.get(name, allowed[0])
    if value not in allowed:
        raise ConfigError(f"radius: {name} must be one of {', '.join(allowed)}, not {clean(value, 40)!r}")
    return str(value)


def _attributes(value: object, name: str, needed: bool) -> Attributes:
    """{"Attribute-Name": "value", ...} or [["Attribute-Name", "value"], ...] (repeats allowed)."""
    if value is None:
        if needed:
            raise ConfigError(f"radius: {name} is needed with coa (e.g. {{\"Mikrotik-Address-List\": "
                              f"\"suspended\"}} or {{\"Filter-Id\": \"suspended\"}})")
        return ()
    items = list(value.items()) if isinstance(value, dict) else value
    if not isinstance(items, list) or not items or len(items) > 20 or not all(
            isinstance(i, list | tuple) and len(i) == 2 and isinstance(i[0], str) and 0 < len(i[0]) <= 64
            and isinstance(i[1], str | int) and not isinstance(i[1], bool) for i in items):
        raise ConfigError(f"radius: {name} must be an object of 1-20 attribute names to values (or a list of "
                          f"[name, value] pairs)")
    return tuple((str(k), str(v)) for k, v in items)


def _nas_ip(value: object, address: str | None) -> str:
    text = value if value is not None else (parse_address(address)[0] if address else None)
    try:
        return str(ipaddress.ip_address(str(text)))
    except ValueError:
        where = "the nas_ip option" if value is not None else "the address's host (set nas_ip)"
        raise ConfigError(f"radius: {where} must be the NAS-IP-Address that identifies the NAS in radacct, an IP "
                          f"address, not {clean(text, 60)!r}") from None


def _number(value: object, name: str, kind: type, allow_zero: bool = False, top: float = 600) -> float:
    try:
        number = kind(value) if not isinstance(value, bool) else None
    except (TypeError, ValueError):
        number = None
    if number is None or number < 0 or (number == 0 and not allow_zero) or number > top:
        raise ConfigError(f"radius: {name} must be a {'non-negative' if allow_zero else 'positive'} number "
                          f"up to {top:g}")
    return float(number)


def shared_secret(secret: object, credential: str) -> bytes:
    """The NAS's shared secret: the credential file's text."""
    if not isinstance(secret, str) or not secret or len(secret.encode()) > 128:
        raise ConfigError(f"radius: credential {credential!r} must hold the NAS's shared secret as plain text "
                          f"(1-128 octets)")
    return secret.encode()


def suspended(policy: Policy, group: str) -> bool:
    """Whether `group` wins: its row sorts strictly before every other group of the user."""
    mine = [p for g, p in policy.groups if g == group]
    others = [p for g, p in policy.groups if g != group]
    return bool(mine) and (not others or min(mine) < min(others))


def suspend_priority(policy: Policy, group: str) -> int:
    """The priority that makes `group` win: one before the user's first other group (0 when none)."""
    others = [p for g, p in policy.groups if g != group]
    return min(0, min(others) - 1) if others else 0


def state_of(policy: Policy, opts: Options, what: str) -> State:
    """off: suspended and no session left open on this NAS (with coa the session stays: the row decides)."""
    if not policy.known:
        raise PermanentError(f"{what}: no such subscriber in the policy store (no radcheck, radreply or "
                             f"radusergroup row)")
    if not suspended(policy, opts.suspended_group):
        return "on"
    return "off" if opts.suspend == "coa" or not policy.sessions else "on"


def session_attributes(user: str, nas_ip: str, session: Session | None) -> Attributes:
    """What names a session to the NAS: NAS-IP-Address, User-Name, and from radacct Acct-Session-Id and
    Framed-IP-Address (NASes differ in which they need; all of them always agree)."""
    attrs: list[tuple[str, str]] = [("NAS-IP-Address" if ":" not in nas_ip else "NAS-IPv6-Address", nas_ip),
                                    ("User-Name", user)]
    if session is not None:
        if 0 < len(session.acct_session_id.encode()) <= MAX_USER:  # radacct is not ours: what cannot go, stays
            attrs.append(("Acct-Session-Id", session.acct_session_id))
        if session.framed_ip and ":" not in session.framed_ip:
            attrs.append(("Framed-IP-Address", session.framed_ip))
    return tuple(attrs)


def nak_error(code: int, causes: list[int], what: str) -> Exception | None:
    """None when the reply means the session is gone (an ACK, or NAK 503); else the error to raise."""
    if code in ACKS or SESSION_NOT_FOUND in causes:
        return None
    if code not in NAKS:
        return PermanentError(f"{what}: the NAS answered with packet code {code}, neither ACK nor NAK")
    if not causes:
        return PermanentError(f"{what}: the NAS refused the request (NAK without Error-Cause)")
    cause = causes[0]
    name, hint = ERROR_CAUSES.get(cause, ("unknown Error-Cause", ""))
    text = f"{what}: the NAS refused the request: Error-Cause {cause} {name}" + (f" ({hint})" if hint else "")
    return TransientError(text) if cause in TRANSIENT_CAUSES else PermanentError(text)


def no_answer(what: str, tries: int, credential: str | None) -> str:
    cred = f"credential {credential!r}" if credential else "the credential"
    return (f"{what}: no answer to {tries} {'try' if tries == 1 else 'tries'}: the NAS is down or drops the "
            f"requests (a NAS drops a request signed with another shared secret without a word: check {cred}, "
            f"and that the NAS accepts Dynamic Authorization from this host, e.g. MikroTik "
            f"`/radius incoming set accept=yes`)")


def dropped(what: str, tries: int, answer: str, credential: str | None) -> str:
    """The NAS's host answers (its TCP `answer`: accepted or refused) but its DAS dropped every try."""
    cred = f"credential {credential!r}" if credential else "the credential"
    return (f"{what}: no answer to {tries} {'try' if tries == 1 else 'tries'}, yet the NAS's host answers (a TCP "
            f"connection to that port was {answer} at once): the NAS received the requests and dropped them, as it "
            f"does one signed with another shared secret: check the secret in {cred} against the NAS's; or the NAS "
            f"does not take Dynamic Authorization from this host (its DAS client list, e.g. MikroTik `/radius` "
            f"entries with `incoming` accepted, or a firewall dropping UDP to that port)")
