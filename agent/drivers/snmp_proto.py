"""The pure parts of the `snmp` driver: service keys, options, OIDs, reply checks, error mapping.

Nothing here does I/O or imports pysnmp: replies arrive as plain values (int, bytes, Absent,
Unexpected), converted once at the transport's edge, so every decision is testable on data.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from agent.errors import ConfigError, PermanentError, TransientError
from agent.model.device import State
from agent.text import clean

Oid = tuple[int, ...]

IF_DESCR: Oid = (1, 3, 6, 1, 2, 1, 2, 2, 1, 2)            # IF-MIB ifDescr
IF_ADMIN_STATUS: Oid = (1, 3, 6, 1, 2, 1, 2, 2, 1, 7)     # IF-MIB ifAdminStatus: up(1) down(2) testing(3)
IF_NAME: Oid = (1, 3, 6, 1, 2, 1, 31, 1, 1, 1, 1)         # IF-MIB ifXTable ifName
SYS_UPTIME: Oid = (1, 3, 6, 1, 2, 1, 1, 3, 0)             # SNMPv2-MIB sysUpTime.0 (probe)
ADMIN_VALUES: dict[State, int] = {"on": 1, "off": 2}
MAX_INDEX = 2**31 - 1
MAX_ROWS = 10_000         # a walk stops with an error past this many rows
MAX_NAME = 255            # DisplayString limit
PER_REQUEST = 32          # varbinds per GET (~650 bytes): an agent that answers tooBig gets halves

AUTH_PROTOCOLS = ("md5", "sha", "sha224", "sha256", "sha384", "sha512")
# aes192/aes256 are the Blumenthal key extension (net-snmp's AES-192/AES-256); the -c forms are the
# Reeder ("Cisco") extension that many switches use under the same name.
PRIV_PROTOCOLS = ("des", "3des", "aes", "aes128", "aes192", "aes256", "aes192c", "aes256c", "none")
VERSIONS = ("1", "2c", "3")

# SNMP PDU error-status names (RFC 3416) by what the caller must do.
CONFIG_STATUSES = {"noAccess", "authorizationError", "readOnly"}
MISSING_STATUSES = {"noSuchName", "noCreation", "inconsistentName"}
TRANSIENT_STATUSES = {"tooBig", "genErr", "resourceUnavailable", "commitFailed", "undoFailed"}
# Report PDUs / USM failures: the v3 user, its keys or its protocols are wrong.
CONFIG_INDICATIONS = {"UnknownUserName", "WrongDigest", "UnknownSecurityName", "UnsupportedSecurityLevel",
                      "DecryptionError", "AuthenticationFailure", "AuthenticationError",
                      "UnsupportedAuthProtocol", "UnsupportedPrivProtocol", "NotInView", "NoSuchView",
                      "NoAccessEntry", "NoGroupName", "NoSuchContext", "UnknownCommunityName"}

_KEY = re.compile(r"^(if|ifindex):(.+)$", re.DOTALL)
_UNSAFE_NAME = re.compile("[\x00-\x1f\x7f]")


@dataclass(frozen=True)
class Absent:
    """A varbind exception value: noSuchObject, noSuchInstance or endOfMibView."""

    kind: str


@dataclass(frozen=True)
class Unexpected:
    """A value of a type the driver does not use (its type name only)."""

    type_name: str


Value = int | bytes | Absent | Unexpected


class MissingInterface(PermanentError):
    """The interface (or its ifIndex) does not exist on the device: re-resolve a cached name."""


@dataclass(frozen=True)
class ServiceKey:
    """`if:<name>` (by ifName, else ifDescr) or `ifindex:<n>`."""

    name: str | None = None
    index: int | None = None

    def __str__(self) -> str:
        return f"ifindex:{self.index}" if self.name is None else f"if:{self.name}"


@dataclass(frozen=True)
class Options:
    version: str
    timeout: float
    retries: int
    user: str | None = None
    auth_protocol: str = "sha"
    priv_protocol: str = "aes"

    @property
    def attempt_timeout(self) -> float:
        """Seconds per UDP attempt: the operation's timeout shared by the first try and its retries."""
        return self.timeout / (self.retries + 1)


def parse_service(key: str) -> ServiceKey:
    """Parse a service key, or raise PermanentError before any I/O."""
    m = _KEY.match(key) if isinstance(key, str) else None
    if m is None:
        raise PermanentError(f"snmp: service key {clean(key, 100)!r} is not if:<ifName or ifDescr> or ifindex:<n>")
    kind, rest = m.groups()
    if kind == "ifindex":
        if not rest.isascii() or not rest.isdigit() or not 1 <= int(rest) <= MAX_INDEX:
            raise PermanentError(f"snmp: {clean(key, 100)!r}: the ifIndex must be a number from 1 to {MAX_INDEX}")
        return ServiceKey(index=int(rest))
    if len(rest) > MAX_NAME or _UNSAFE_NAME.search(rest):
        raise PermanentError(f"snmp: {clean(key, 100)!r}: an interface name is 1-{MAX_NAME} printable characters")
    return ServiceKey(name=rest)


def parse_address(address: str | None) -> tuple[str, int]:
    """host[:port] (UDP 161 by default); IPv6 literals in brackets: [::1]:161."""
    if not address or not isinstance(address, str) or "://" in address or "/" in address:
        raise ConfigError("snmp: the device needs an address host[:port] (UDP, port 161 by default)")
    host, port = address, "161"
    if address.startswith("["):
        host, _, tail = address[1:].partition("]")
        if tail:
            if not tail.startswith(":"):
                raise ConfigError(f"snmp: address {clean(address, 100)!r} is not [host]:port")
            port = tail[1:]
    elif address.count(":") == 1:
        host, port = address.split(":")
    if not host or not port.isascii() or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConfigError(f"snmp: address {clean(address, 100)!r} is not host[:port] with a port 1-65535")
    return host, int(port)


def parse_options(options: dict[str, object], default_timeout: float) -> Options:
    """Check and normalise the device's options; ConfigError names the bad one."""
    version = str(options.get("version", "2c"))
    if version not in VERSIONS:
        raise ConfigError(f"snmp: version must be 1, 2c or 3, not {clean(version, 20)!r}")
    timeout = _number(options.get("timeout", default_timeout), "timeout", float)
    retries = int(_number(options.get("retries", 1), "retries", int, allow_zero=True))
    if version in ("1", "2c"):
        return Options(version, timeout, retries)
    user = options.get("user")
    if not isinstance(user, str) or not user or len(user) > 32:
        raise ConfigError("snmp: version 3 needs the option user (the USM user name, 1-32 characters)")
    auth = str(options.get("auth_protocol", "sha")).lower()
    priv = str(options.get("priv_protocol", "aes")).lower()
    if auth not in AUTH_PROTOCOLS:
        raise ConfigError(f"snmp: auth_protocol must be one of {', '.join(AUTH_PROTOCOLS)}")
    if priv not in PRIV_PROTOCOLS:
        raise ConfigError(f"snmp: priv_protocol must be one of {', '.join(PRIV_PROTOCOLS)}")
    return Options(version, timeout, retries, user, auth, priv)


def _number(value: object, name: str, kind: type, allow_zero: bool = False) -> float:
    try:
        number = kind(value) if not isinstance(value, bool) else None
    except (TypeError, ValueError):
        number = None
    if number is None or number < 0 or (number == 0 and not allow_zero) or number > 600:
        raise ConfigError(f"snmp: {name} must be a {'non-negative' if allow_zero else 'positive'} number "
                          f"up to 600")
    return float(number)


def v3_keys(secret: object, credential: str, priv_protocol: str) -> tuple[str, str | None]:
    """The auth and priv keys from the v3 credential {"auth_key": ..., "priv_key": ...}."""
    if not isinstance(secret, dict) or not isinstance(secret.get("auth_key"), str):
        raise ConfigError(f"snmp: credential {credential!r} must be a JSON object with auth_key and priv_key")
    auth, priv = secret["auth_key"], secret.get("priv_key")
    if priv_protocol != "none" and not isinstance(priv, str):
        raise ConfigError(f"snmp: credential {credential!r} has no priv_key (or set priv_protocol none)")
    if len(auth) < 8 or (priv_protocol != "none" and len(str(priv)) < 8):
        raise ConfigError(f"snmp: credential {credential!r}: USM keys must be at least 8 characters")
    return auth, (priv if priv_protocol != "none" else None)


def community(secret: object, credential: str) -> str:
    """The v2c write community: the credential file's text."""
    if not isinstance(secret, str) or not secret or len(secret) > 255:
        raise ConfigError(f"snmp: credential {credential!r} must hold the write community as plain text")
    return secret


def admin_oid(index: int) -> Oid:
    return (*IF_ADMIN_STATUS, index)


def to_state(value: Value, what: str) -> State:
    """ifAdminStatus to on/off; a missing instance or an odd value is permanent."""
    if isinstance(value, Absent):
        raise MissingInterface(f"{what}: no such interface ({value.kind})")
    if isinstance(value, bool) or not isinstance(value, int):
        kind = value.type_name if isinstance(value, Unexpected) else type(value).__name__
        raise PermanentError(f"{what}: ifAdminStatus is a {clean(kind, 40)}, not an INTEGER")
    for state, number in ADMIN_VALUES.items():
        if value == number:
            return state
    name = {3: "testing(3)"}.get(value, str(value))
    raise PermanentError(f"{what}: ifAdminStatus is {name}, neither up(1) nor down(2)")


def display(value: Value) -> str | None:
    """A DisplayString reply as text (None unless it is an OCTET STRING)."""
    if not isinstance(value, bytes):
        return None
    return value[: MAX_NAME * 4].decode("utf-8", errors="replace")


def column_rows(base: Oid, varbinds: list[tuple[Oid, Value]]) -> tuple[dict[int, str], Oid | None]:
    """One GETBULK page of a table column: the rows it holds, and the OID to continue from
    (None at the column's end). Rows are ifIndex -> text; non-text rows are skipped."""
    rows: dict[int, str] = {}
    last: Oid | None = None
    for oid, value in varbinds:
        if isinstance(value, Absent) or oid[: len(base)] != base:
            return rows, None
        if last is not None and oid <= last:
            raise PermanentError(f"the device returned OIDs out of order in {dotted(base)}")
        last = oid
        if len(oid) == len(base) + 1 and 1 <= oid[-1] <= MAX_INDEX and (text := display(value)) is not None:
            rows[oid[-1]] = text
    return rows, last


@dataclass(frozen=True)
class InterfaceMap:
    """Interface names to ifIndex, as walked from ifName and ifDescr."""

    by_name: dict[int, str]
    by_descr: dict[int, str]

    def find(self, name: str) -> int | None:
        """The ifIndex whose ifName is `name`, else whose ifDescr is; PermanentError when ambiguous."""
        for column, table in (("ifName", self.by_name), ("ifDescr", self.by_descr)):
            hits = sorted(i for i, text in table.items() if text == name)
            if len(hits) > 1:
                raise PermanentError(f"interface {clean(name, 100)!r} is ambiguous: {column} of ifIndex "
                                     f"{', '.join(map(str, hits[:10]))}; use ifindex:<n>")
            if hits:
                return hits[0]
        return None

    def names_of(self, index: int) -> set[str]:
        return {t for t in (self.by_name.get(index), self.by_descr.get(index)) if t is not None}


def name_oids(index: int) -> list[Oid]:
    """The OIDs that name an interface: read with its status to check a cached ifIndex still fits."""
    return [(*IF_NAME, index), (*IF_DESCR, index)]


def still_named(name: str, values: list[Value]) -> bool:
    """Whether an interface still answers to `name` (ifName or ifDescr) at a cached ifIndex."""
    return any(display(v) == name for v in values)


def raise_for(indication: str | None, status: str | None, what: str, credential: str | None,
              version: str) -> None:
    """Map a pysnmp error indication (class name) or a PDU error-status name to our error kinds."""
    cred = f"credential {credential!r}" if credential else "the credential"
    if indication:
        if indication in CONFIG_INDICATIONS:
            raise ConfigError(f"{what}: the SNMPv3 agent refused the user or its keys ({indication}): "
                              f"check the user, auth/priv protocols and {cred}")
        raise TransientError(f"{what}: {clean(indication, 80)}")
    if not status or status == "noError":
        return
    if status == "notWritable":  # the agent lets no one write it: not a question of the credential
        raise PermanentError(f"{what}: notWritable: this device does not let ifAdminStatus of this interface be "
                             f"written (some switches keep it read-only, or only for some ports)")
    if status in CONFIG_STATUSES:
        access = "v3 user" if version == "3" else "write community"
        raise ConfigError(f"{what}: {status}: the {access} in {cred} may not do this (read-only?)")
    if status == "tooBig":
        raise TooBig(f"{what}: the device answered tooBig (the reply would not fit in one message)")
    if status in MISSING_STATUSES:
        raise MissingInterface(f"{what}: no such interface ({status})")
    if status in TRANSIENT_STATUSES:
        raise TransientError(f"{what}: the device answered {status}")
    raise PermanentError(f"{what}: the device refused the request ({clean(status, 40)})")


def v1_set_refused(what: str, credential: str | None) -> ConfigError:
    """noSuchName to an SNMPv1 SET: v1 has no noAccess or notWritable, and agents answer those (RFC 2576,
    section 4.3) and an unknown object alike with noSuchName; a read-only community is the usual cause."""
    cred = f"credential {credential!r}" if credential else "the credential"
    return ConfigError(f"{what}: noSuchName: SNMPv1 answers noSuchName to a SET it refuses: the community in "
                       f"{cred} may only read (give it write access to ifAdminStatus), this device does not let "
                       f"ifAdminStatus of this interface be written, or the interface is gone")


class TooBig(TransientError):
    """The reply would be larger than the agent can send: ask for less."""


def timed_out(what: str, timeout: float, version: str) -> str:
    hint = f" (an SNMPv{version} agent also stays silent when the community is wrong)" if version != "3" else ""
    return f"{what}: no answer within {timeout:g}s{hint}"


def dotted(oid: Oid) -> str:
    return ".".join(map(str, oid))


def chunks(oids: list[Oid], size: int = PER_REQUEST) -> list[list[Oid]]:
    """Split a many-OID GET into requests of at most `size` varbinds."""
    return [oids[i:i + size] for i in range(0, len(oids), size)]
