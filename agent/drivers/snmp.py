"""`snmp`: switch ports and any interface, by IF-MIB ifAdminStatus (pysnmp 7, numeric OIDs only).

Service keys: `if:<ifName or ifDescr>` (resolved to an ifIndex by walking ifName and ifDescr; the
mapping is cached per device, checked against the interface's name on every use and walked again
when it no longer fits) and `ifindex:<n>`. on = ifAdminStatus up(1), off = down(2).
Options: version (1 | 2c | 3), timeout (seconds for a whole operation, retries included), retries;
for v3 user, auth_protocol, priv_protocol. The credential is the write community (v2c) or
{"auth_key", "priv_key"} (v3). Errors are mapped once, in snmp_proto.raise_for.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Sequence
from typing import Any

from pyasn1.type import univ
from pysnmp.error import PySnmpError
from pysnmp.hlapi.v3arch import asyncio as hl
from pysnmp.proto import rfc1905

from agent.drivers import snmp_proto as p
from agent.drivers.base import DriverContext
from agent.errors import AgentError, ConfigError, NoAnswerError, PermanentError, UnreachableError
from agent.model.device import Device, State
from agent.text import clean

AUTH = {"md5": hl.usmHMACMD5AuthProtocol, "sha": hl.usmHMACSHAAuthProtocol,
        "sha224": hl.usmHMAC128SHA224AuthProtocol, "sha256": hl.usmHMAC192SHA256AuthProtocol,
        "sha384": hl.usmHMAC256SHA384AuthProtocol, "sha512": hl.usmHMAC384SHA512AuthProtocol}
PRIV = {"des": hl.usmDESPrivProtocol, "3des": hl.usm3DESEDEPrivProtocol, "aes": hl.usmAesCfb128Protocol,
        "aes128": hl.usmAesCfb128Protocol, "aes192": hl.usmAesBlumenthalCfb192Protocol,
        "aes256": hl.usmAesBlumenthalCfb256Protocol, "aes192c": hl.usmAesCfb192Protocol,
        "aes256c": hl.usmAesCfb256Protocol, "none": hl.usmNoPrivProtocol}
_ABSENT = {rfc1905.NoSuchObject: "noSuchObject", rfc1905.NoSuchInstance: "noSuchInstance",
           rfc1905.EndOfMibView: "endOfMibView"}


def plain(value: Any) -> p.Value:
    """A pysnmp value as plain data: the one place that looks at ASN.1 types."""
    for cls, kind in _ABSENT.items():
        if isinstance(value, cls):
            return p.Absent(kind)
    tags = getattr(value, "tagSet", None)
    if tags == univ.Integer.tagSet:
        return int(value)
    if tags == univ.OctetString.tagSet:
        return bytes(value.asOctets())
    return p.Unexpected(type(value).__name__)


MAX_REPETITIONS = 25  # rows asked for by one GETBULK; halved on every tooBig answer


def _bulk(repetitions: int) -> Any:
    """GETBULK of the varbinds in args[4:], `repetitions` rows at a time (no non-repeaters)."""
    async def command(*args: Any, **options: Any) -> Any:
        return await hl.bulk_cmd(*args[:4], 0, repetitions, *args[4:], **options)
    return command


def oid_of(name: Any) -> p.Oid:
    return tuple(int(x) for x in (name.getOid() if hasattr(name, "getOid") else name))


class Session:
    """One device's SNMP requests: every call bounded by the attempt timeout, every error mapped."""

    def __init__(self, engine: hl.SnmpEngine, auth: Any, target: Any, device: Device, opts: p.Options) -> None:
        self.engine, self.auth, self.target, self.opts = engine, auth, target, opts
        self.device = device

    async def get(self, oids: list[p.Oid]) -> list[p.Value]:
        """The values of `oids`, in order. A tooBig answer (an old agent may take only RFC 1157's 484-byte
        messages) splits the request in halves, down to one OID, instead of asking the same again."""
        try:
            reply = await self._call(hl.get_cmd, [self._vb(o) for o in oids], f"GET {p.dotted(oids[0])}")
        except p.TooBig:
            if len(oids) == 1:
                raise
            half = len(oids) // 2
            return [*await self.get(oids[:half]), *await self.get(oids[half:])]
        return [plain(vb[1]) for vb in reply]

    async def set(self, oid: p.Oid, value: int, label: str) -> None:
        what = f"{label}: SET {p.dotted(oid)}={value}"
        try:
            await self._call(hl.set_cmd, [hl.ObjectType(hl.ObjectIdentity(p.dotted(oid)), hl.Integer(value))], what)
        except p.MissingInterface:
            if self.opts.version != "1":
                raise
            raise p.v1_set_refused(f"{self.device.id}: {what}", self.device.credential) from None

    async def column(self, base: p.Oid) -> dict[int, str]:
        """Walk one table column with GETBULK (GETNEXT in SNMPv1, which has no GETBULK); ifIndex -> text.
        A tooBig answer halves the rows asked for, down to one, instead of asking the same again."""
        rows: dict[int, str] = {}
        at: p.Oid | None = base
        repetitions = MAX_REPETITIONS
        while at is not None:
            try:
                if self.opts.version == "1":
                    reply = await self._call(hl.next_cmd, [self._vb(at)], f"GETNEXT {p.dotted(base)}")
                else:
                    reply = await self._call(_bulk(repetitions), [self._vb(at)],
                                             f"GETBULK {p.dotted(base)} x{repetitions}")
            except p.TooBig:
                if repetitions == 1 or self.opts.version == "1":
                    raise
                repetitions //= 2
                continue
            except p.MissingInterface:
                if self.opts.version == "1":  # v1 says noSuchName at the end of the MIB view
                    break
                raise
            page, at = p.column_rows(base, [(oid_of(vb[0]), plain(vb[1])) for vb in reply])
            rows.update(page)
            if len(rows) > p.MAX_ROWS:
                raise PermanentError(f"{self.device.id}: {p.dotted(base)} has more than {p.MAX_ROWS} rows")
        return rows

    def _vb(self, oid: p.Oid) -> Any:
        return hl.ObjectType(hl.ObjectIdentity(p.dotted(oid)))

    async def _call(self, command: Any, varbinds: list[Any], what: str) -> Sequence[Any]:
        what = f"{self.device.id}: {what}"
        indication, status, _index, reply = await command(
            self.engine, self.auth, self.target, hl.ContextData(), *varbinds, lookupMib=False)
        if indication is not None and type(indication).__name__ == "RequestTimedOut":
            raise NoAnswerError(p.timed_out(what, self.opts.timeout, self.opts.version))
        name = status.prettyPrint() if hasattr(status, "prettyPrint") else (str(status) if status else None)
        p.raise_for(type(indication).__name__ if indication else None, name, what,
                    self.device.credential, self.opts.version)
        return tuple(reply)


class SnmpDriver:
    name = "snmp"

    def __init__(self, context: DriverContext | None = None) -> None:
        self._context = context or DriverContext()
        self._engines: dict[str, tuple[str, hl.SnmpEngine]] = {}
        self._maps: dict[str, p.InterfaceMap] = {}

    def validate_options(self, device: Device) -> None:
        p.parse_options(device.options, self._context.device_timeout)
        p.parse_address(device.address)
        if not device.credential:
            raise ConfigError("snmp: the device needs a credential (the write community, or the v3 keys)")

    async def read(self, device: Device, service: str) -> State:
        key = p.parse_service(service)
        return await self._bounded(device, lambda s: self._read(s, key))

    async def apply(self, device: Device, service: str, state: State) -> None:
        key = p.parse_service(service)
        await self._bounded(device, lambda s: self._apply(s, key, state))

    async def probe(self, device: Device) -> None:
        await self._bounded(device, lambda s: s.get([p.SYS_UPTIME]))

    async def read_many(self, device: Device, services: Sequence[str]) -> dict[str, State | AgentError]:
        """Many services in few requests (up to PER_REQUEST OIDs each); errors per service."""
        return await self._bounded(device, lambda s: self._read_many(s, services))

    async def close(self) -> None:
        for _fp, engine in self._engines.values():
            engine.close_dispatcher()
        self._engines.clear()

    # -- operations ----------------------------------------------------------------------

    async def _read(self, s: Session, key: p.ServiceKey) -> State:
        index = await self._index(s, key)
        values = await s.get([p.admin_oid(index), *(p.name_oids(index) if key.name else [])])
        if key.name is not None and not p.still_named(key.name, values[1:]):
            index = await self._index(s, key, fresh=True)
            values = await s.get([p.admin_oid(index)])
        return p.to_state(values[0], f"{s.device.id}: {key}")

    async def _apply(self, s: Session, key: p.ServiceKey, state: State) -> None:
        index = await self._index(s, key)
        if key.name is not None and not p.still_named(key.name, await s.get(p.name_oids(index))):
            index = await self._index(s, key, fresh=True)
        await s.set(p.admin_oid(index), p.ADMIN_VALUES[state], str(key))

    async def _read_many(self, s: Session, services: Sequence[str]) -> dict[str, State | AgentError]:
        out: dict[str, State | AgentError] = {}
        oids: dict[str, p.Oid] = {}
        for service in services:
            try:
                oids[service] = p.admin_oid(await self._index(s, p.parse_service(service)))
            except PermanentError as exc:
                out[service] = exc
        for batch in p.chunks(list(dict.fromkeys(oids.values()))):
            for oid, value in zip(batch, await s.get(batch), strict=True):
                for service in (sv for sv, o in oids.items() if o == oid):
                    try:
                        out[service] = p.to_state(value, f"{s.device.id}: {p.parse_service(service)}")
                    except PermanentError as exc:
                        out[service] = exc
        return out

    async def _index(self, s: Session, key: p.ServiceKey, fresh: bool = False) -> int:
        if key.index is not None:
            return key.index
        assert key.name is not None
        ifmap = None if fresh else self._maps.get(s.device.id)
        index = ifmap.find(key.name) if ifmap else None
        if index is None and not fresh and ifmap is not None:
            ifmap = None  # not in the cached map: the device may have a new interface
        if ifmap is None:
            ifmap = p.InterfaceMap(await s.column(p.IF_NAME), await s.column(p.IF_DESCR))
            self._maps[s.device.id] = ifmap
            index = ifmap.find(key.name)
        if index is None:
            raise p.MissingInterface(f"{s.device.id}: no interface named {clean(key.name, 100)!r} "
                                     f"(neither an ifName nor an ifDescr)")
        return index

    # -- transport -----------------------------------------------------------------------

    async def _bounded(self, device: Device, op: Any) -> Any:
        """Run one operation within the device's timeout; the whole of it, every request included."""
        opts = p.parse_options(device.options, self._context.device_timeout)
        try:
            async with asyncio.timeout(opts.timeout):
                return await op(await self._session(device, opts))
        except TimeoutError:
            raise NoAnswerError(p.timed_out(f"{device.id}: {device.address}", opts.timeout, opts.version)) from None
        except PySnmpError as exc:
            raise UnreachableError(f"{device.id}: {clean(exc, 200)}") from None

    async def _session(self, device: Device, opts: p.Options) -> Session:
        host, port = p.parse_address(device.address)
        auth, digest = self._auth(device, opts)
        target = await hl.UdpTransportTarget.create((host, port), timeout=opts.attempt_timeout,
                                                    retries=opts.retries)
        return Session(self._engine(device, digest), auth, target, device, opts)

    def _auth(self, device: Device, opts: p.Options) -> tuple[Any, str]:
        """The pysnmp auth data, and a digest of it that tells when the credential changed."""
        if self._context.credentials is None or not device.credential:
            raise ConfigError(f"{device.id}: snmp needs a credential and a credential store")
        secret = self._context.credentials.get_json(device.credential)
        digest = hashlib.sha256(json.dumps([device.address, device.options, secret], sort_keys=True,
                                           default=str).encode()).hexdigest()
        if opts.version in ("1", "2c"):
            return hl.CommunityData(p.community(secret, device.credential),
                                    mpModel=0 if opts.version == "1" else 1), digest
        auth_key, priv_key = p.v3_keys(secret, device.credential, opts.priv_protocol)
        return hl.UsmUserData(opts.user, auth_key, priv_key, authProtocol=AUTH[opts.auth_protocol],
                              privProtocol=PRIV[opts.priv_protocol]), digest

    def _engine(self, device: Device, fingerprint: str) -> hl.SnmpEngine:
        """One engine per device, rebuilt when its address, options or credential change."""
        known = self._engines.get(device.id)
        if known is not None and known[0] == fingerprint:
            return known[1]
        if known is not None:
            known[1].close_dispatcher()
            self._maps.pop(device.id, None)
        engine = hl.SnmpEngine()
        self._engines[device.id] = (fingerprint, engine)
        return engine
