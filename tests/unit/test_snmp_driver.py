"""The pure parts of the snmp driver: keys, addresses, options, replies, error mapping, name resolution."""

from __future__ import annotations

from typing import Any

import pytest
from pysnmp.proto import rfc1902, rfc1905

from agent.drivers import snmp_proto as p
from agent.drivers.snmp import SnmpDriver, plain
from agent.errors import ConfigError, PermanentError, TransientError
from agent.model.device import Device


@pytest.mark.parametrize(("key", "parsed"), [
    ("if:swp1", p.ServiceKey(name="swp1")), ("if:ge-0/0/1", p.ServiceKey(name="ge-0/0/1")),
    ("if:GigabitEthernet1/0/24 uplink", p.ServiceKey(name="GigabitEthernet1/0/24 uplink")),
    ("ifindex:1", p.ServiceKey(index=1)), ("ifindex:2147483647", p.ServiceKey(index=2147483647))])
def test_service_keys_parse(key: str, parsed: p.ServiceKey) -> None:
    assert p.parse_service(key) == parsed
    assert str(parsed) == key


@pytest.mark.parametrize("key", ["swp1", "if:", "ifindex:", "ifindex:0", "ifindex:-1", "ifindex:2147483648",
                                 "ifindex:1.5", "ifindex:\u0661", "if:a\nb", "if:\x1b[31m", "if:" + "x" * 256,
                                 "port:1", "IF:swp1", ""])
def test_bad_service_keys_are_permanent(key: str) -> None:
    with pytest.raises(PermanentError) as err:
        p.parse_service(key)
    assert "\n" not in str(err.value) and "\x1b" not in str(err.value)


@pytest.mark.parametrize(("address", "parsed"), [
    ("10.0.0.2", ("10.0.0.2", 161)), ("10.0.0.2:1161", ("10.0.0.2", 1161)), ("sw1.example", ("sw1.example", 161)),
    ("[2001:db8::1]:162", ("2001:db8::1", 162)), ("[::1]", ("::1", 161))])
def test_addresses(address: str, parsed: tuple[str, int]) -> None:
    assert p.parse_address(address) == parsed


@pytest.mark.parametrize("address", [None, "", "udp://10.0.0.1", "10.0.0.1:0", "10.0.0.1:70000", "10.0.0.1:x",
                                     "[::1]x", ":161", "a/b"])
def test_bad_addresses_are_config_errors(address: str | None) -> None:
    with pytest.raises(ConfigError):
        p.parse_address(address)


def test_options_defaults_and_v3() -> None:
    assert p.parse_options({}, 10.0) == p.Options("2c", 10.0, 1)
    o = p.parse_options({"version": "3", "user": "ops", "auth_protocol": "SHA256", "priv_protocol": "aes256",
                         "timeout": 4, "retries": 3}, 10.0)
    assert (o.user, o.auth_protocol, o.priv_protocol, o.timeout, o.retries) == ("ops", "sha256", "aes256", 4.0, 3)
    assert o.attempt_timeout == 1.0


@pytest.mark.parametrize("options", [{"version": "2"}, {"version": "3"}, {"version": "3", "user": ""},
                                     {"version": "3", "user": "u", "auth_protocol": "sha1024"},
                                     {"version": "3", "user": "u", "priv_protocol": "rot13"},
                                     {"timeout": 0}, {"timeout": "soon"}, {"timeout": True}, {"retries": -1},
                                     {"retries": 1000}])
def test_bad_options_are_config_errors(options: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        p.parse_options(options, 10.0)


def test_credentials_checked_without_quoting_them() -> None:
    assert p.community("private-rw", "sw") == "private-rw"
    assert p.v3_keys({"auth_key": "a" * 8, "priv_key": "b" * 8}, "sw", "aes") == ("a" * 8, "b" * 8)
    assert p.v3_keys({"auth_key": "a" * 8}, "sw", "none") == ("a" * 8, None)
    for secret, priv in (({"auth_key": "short1", "priv_key": "b" * 8}, "aes"), ({"auth_key": "a" * 8}, "aes"),
                         ("just-a-string", "aes"), ({"priv_key": "b" * 8}, "aes")):
        with pytest.raises(ConfigError) as err:
            p.v3_keys(secret, "sw-keys", priv)
        assert "sw-keys" in str(err.value) and "short1" not in str(err.value)
    with pytest.raises(ConfigError):
        p.community({"auth_key": "x"}, "sw")


def test_admin_status_to_state() -> None:
    assert p.to_state(1, "sw") == "on" and p.to_state(2, "sw") == "off"
    with pytest.raises(PermanentError, match="testing"):
        p.to_state(3, "sw: if:swp1")
    for value in (7, b"\x01", p.Unexpected("Counter32"), True):
        with pytest.raises(PermanentError):
            p.to_state(value, "sw")
    with pytest.raises(p.MissingInterface, match="noSuchInstance"):
        p.to_state(p.Absent("noSuchInstance"), "sw: ifindex:9")


def test_plain_values_from_pysnmp_types() -> None:
    assert plain(rfc1902.Integer32(2)) == 2 and plain(rfc1902.Integer(1)) == 1
    assert plain(rfc1902.OctetString(b"swp1")) == b"swp1"
    assert plain(rfc1905.noSuchInstance) == p.Absent("noSuchInstance")
    assert plain(rfc1905.endOfMibView) == p.Absent("endOfMibView")
    assert plain(rfc1902.Counter32(1)) == p.Unexpected("Counter32")  # an INTEGER is required, not a counter
    assert plain(rfc1902.IpAddress("10.0.0.1")) == p.Unexpected("IpAddress")


def test_column_pages_stop_at_the_columns_end() -> None:
    base = p.IF_NAME
    rows, nxt = p.column_rows(base, [((*base, 1), b"lo"), ((*base, 3), b"swp1"), ((*base, 5), 7)])
    assert rows == {1: "lo", 3: "swp1"} and nxt == (*base, 5)
    rows, nxt = p.column_rows(base, [((*base, 6), b"swp2"), ((*p.IF_NAME[:-1], 2, 1), b"next column")])
    assert rows == {6: "swp2"} and nxt is None
    assert p.column_rows(base, [((*base, 7), p.Absent("endOfMibView"))]) == ({}, None)
    with pytest.raises(PermanentError, match="out of order"):
        p.column_rows(base, [((*base, 5), b"a"), ((*base, 2), b"b")])


def test_interface_names_prefer_ifname_and_refuse_ambiguity() -> None:
    m = p.InterfaceMap(by_name={1: "lo", 3: "swp1", 4: "Gi1/0/1"}, by_descr={3: "GigabitEthernet1/0/1", 4: "swp1"})
    assert m.find("swp1") == 3  # ifName wins over another port's ifDescr
    assert m.find("GigabitEthernet1/0/1") == 3 and m.find("nope") is None
    with pytest.raises(PermanentError, match="ambiguous"):
        p.InterfaceMap(by_name={3: "port", 4: "port"}, by_descr={}).find("port")
    assert p.still_named("swp1", [p.Absent("noSuchInstance"), b"swp1"])
    assert not p.still_named("swp1", [b"old1", b"old1"])


@pytest.mark.parametrize(("indication", "status", "kind"), [
    ("WrongDigest", None, ConfigError), ("UnknownUserName", None, ConfigError),
    ("UnsupportedSecurityLevel", None, ConfigError), ("DecryptionError", None, ConfigError),
    ("SomethingElse", None, TransientError),
    (None, "noAccess", ConfigError), (None, "notWritable", PermanentError), (None, "authorizationError", ConfigError),
    (None, "tooBig", p.TooBig),
    (None, "readOnly", ConfigError), (None, "noSuchName", p.MissingInterface), (None, "noCreation", p.MissingInterface),
    (None, "genErr", TransientError), (None, "resourceUnavailable", TransientError),
    (None, "wrongValue", PermanentError), (None, "badValue", PermanentError)])
def test_error_mapping(indication: str | None, status: str | None, kind: type[Exception]) -> None:
    with pytest.raises(kind) as err:
        p.raise_for(indication, status, "sw: if:swp1", "sw-cred", "2c")
    assert type(err.value) is kind
    if kind is ConfigError:
        assert "sw-cred" in str(err.value)


def test_not_writable_names_the_device_not_the_credential() -> None:
    with pytest.raises(PermanentError, match="does not let ifAdminStatus of this interface be written") as err:
        p.raise_for(None, "notWritable", "sw: if:swp1", "sw-cred", "2c")
    assert "read-only?" not in str(err.value) and "sw-cred" not in str(err.value)


async def test_too_big_halves_the_rows_asked_for_instead_of_asking_again() -> None:
    from pyasn1.type import univ

    from agent.drivers.snmp import Session
    asked: list[str] = []
    column = (1, 3, 6, 1, 2, 1, 31, 1, 1, 1, 1)

    async def call(command: Any, varbinds: list[Any], what: str) -> list[Any]:
        asked.append(what.rpartition(" ")[2])
        if int(what.rpartition("x")[2]) > 6:
            raise p.TooBig("sw: tooBig")
        return [((*column, 1), univ.OctetString(b"swp1")), ((*column, 2), univ.OctetString(b"swp2")),
                ((1, 3, 6, 1, 2, 1, 31, 1, 1, 1, 2, 1), univ.OctetString(b"past the column"))]

    s = Session(None, None, None, Device("sw", "snmp", "10.0.0.2"), p.parse_options({}, 5.0))
    s._call = call  # type: ignore[method-assign]
    assert await s.column(column) == {1: "swp1", 2: "swp2"}
    assert asked == ["x25", "x12", "x6"]


async def test_a_get_answered_too_big_is_split_in_halves_instead_of_asked_again() -> None:
    """Old SNMPv1 CPEs may take messages of only 484 bytes (RFC 1157's minimum): 32 ifAdminStatus varbinds
    do not fit in one reply there."""
    from pyasn1.type import univ

    from agent.drivers.snmp import Session
    sizes: list[int] = []

    async def call(command: Any, varbinds: list[Any], what: str) -> list[Any]:
        sizes.append(len(varbinds))
        if len(varbinds) > 8:
            raise p.TooBig("sw: tooBig")
        return [(oid, univ.Integer(oid[-1] % 3)) for oid in varbinds]

    s = Session(None, None, None, Device("sw", "snmp", "10.0.0.2"), p.parse_options({"version": "1"}, 5.0))
    s._call = call  # type: ignore[method-assign]
    s._vb = lambda oid: oid  # type: ignore[method-assign]
    assert await s.get([p.admin_oid(i) for i in range(1, 21)]) == [i % 3 for i in range(1, 21)]
    assert sizes == [20, 10, 5, 5, 10, 5, 5]

    async def always_too_big(command: Any, varbinds: list[Any], what: str) -> list[Any]:
        raise p.TooBig("sw: tooBig")

    s._call = always_too_big  # type: ignore[method-assign]
    with pytest.raises(p.TooBig):
        await s.get([p.admin_oid(1)])


def test_snmpv1_for_old_cpes() -> None:
    assert p.parse_options({"version": "1"}, 5.0).version == "1"
    assert "SNMPv1 agent also stays silent" in p.timed_out("sw", 2, "1")


def test_no_error_passes_and_timeouts_explain_v2c_silence() -> None:
    p.raise_for(None, "noError", "sw", "c", "3")
    p.raise_for(None, None, "sw", "c", "3")
    assert "community" in p.timed_out("sw", 2, "2c") and "community" not in p.timed_out("sw", 2, "3")


def test_many_oids_are_split_into_bounded_requests() -> None:
    oids = [p.admin_oid(i) for i in range(1, 71)]
    assert [len(c) for c in p.chunks(oids)] == [32, 32, 6]
    assert [o for c in p.chunks(oids) for o in c] == oids


class StubSession:
    """Stands in for the transport: an OID table and a record of SETs (no SNMP, no socket)."""

    def __init__(self, table: dict[p.Oid, p.Value]) -> None:
        self.device = Device("sw", "snmp", "10.0.0.2")
        self.table, self.sets, self.walks = table, [], 0

    async def get(self, oids: list[p.Oid]) -> list[p.Value]:
        return [self.table.get(o, p.Absent("noSuchInstance")) for o in oids]

    async def set(self, oid: p.Oid, value: int, label: str) -> None:
        self.sets.append((oid, value))

    async def column(self, base: p.Oid) -> dict[int, str]:
        self.walks += 1
        return {o[-1]: v.decode() for o, v in self.table.items()
                if o[:-1] == base and isinstance(v, bytes)}


def names(index_to_name: dict[int, str]) -> dict[p.Oid, p.Value]:
    return {(*p.IF_NAME, i): n.encode() for i, n in index_to_name.items()} | \
           {p.admin_oid(i): 1 for i in index_to_name}


async def test_a_cached_index_that_changed_name_is_resolved_again() -> None:
    driver = SnmpDriver()
    s = StubSession(names({3: "swp1", 5: "swp2"}))
    assert await driver._read(s, p.parse_service("if:swp1")) == "on"  # type: ignore[arg-type]
    s.table = names({3: "old1", 5: "swp1"})  # after a reboot, ifIndex 3 is another port
    await driver._apply(s, p.parse_service("if:swp1"), "off")  # type: ignore[arg-type]
    assert s.sets == [(p.admin_oid(5), 2)] and s.walks == 4  # two columns, walked twice


async def test_a_cached_name_is_used_without_walking_again() -> None:
    driver = SnmpDriver()
    s = StubSession(names({3: "swp1"}))
    for _ in range(3):
        await driver._apply(s, p.parse_service("if:swp1"), "on")  # type: ignore[arg-type]
    assert s.walks == 2 and s.sets == [(p.admin_oid(3), 1)] * 3


async def test_invalid_keys_fail_before_any_io() -> None:
    driver = SnmpDriver()
    dev = Device("sw", "snmp", "192.0.2.1", options={"timeout": 30}, credential="none")
    with pytest.raises(PermanentError):
        await driver.read(dev, "swp1")
    with pytest.raises(PermanentError):
        await driver.apply(dev, "ifindex:0", "off")
