"""The `routeros` driver over the RouterOS binary API (api://, api-ssl://) against the API fake
(tests/support/routeros_api_fake.py), which shares its router with the REST fake; and the fake itself
checked by librouteros, an independent client (GPL-2.0+, test-only). Fake-backed, not proof against
a router."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from librouteros import async_connect
from librouteros.exceptions import FatalError, TrapError
from librouteros.login import async_plain, async_token
from librouteros.query import Key

from agent.drivers.base import CredentialStore, DriverContext
from agent.drivers.routeros import COMMENT, RouterOsDriver
from agent.errors import ConfigError, PermanentError, TransientError
from agent.model.device import Device
from tests.support.routeros_api_fake import RouterOsApiFake
from tests.support.routeros_fake import Cert, RouterOsFake, self_signed
from tests.support.wait import until

pytestmark = pytest.mark.fake_backed
USER, PASSWORD = "agent", "pw-Api-7c31e8"


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> Cert:
    return self_signed(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def context(tmp_path_factory: pytest.TempPathFactory) -> DriverContext:
    creds = tmp_path_factory.mktemp("credentials")
    (creds / "router-1").write_text(PASSWORD + "\n")
    (creds / "router-wrong").write_text("not-the-password\n")
    return DriverContext(device_timeout=5.0, credentials=CredentialStore(creds))


@pytest.fixture(params=["plain", "challenge"])
async def api(request: pytest.FixtureRequest) -> AsyncIterator[RouterOsApiFake]:
    """The API of a router, logging in the 6.43+ way or with the older MD5 challenge."""
    fake = await RouterOsApiFake(RouterOsFake(USER, PASSWORD), login=request.param).start()
    yield fake
    await fake.stop()


@pytest.fixture
async def driver(context: DriverContext) -> AsyncIterator[RouterOsDriver]:
    d = RouterOsDriver(context)
    yield d
    await d.close()


def dev(api: RouterOsApiFake, credential: str = "router-1", **options: Any) -> Device:
    return Device("router-1", "routeros", api.address, credential=credential,
                  options={"username": USER, "timeout": 2.0, **options})


def port_of(api: RouterOsApiFake) -> int:
    return int(api.address.rpartition(":")[2])


# -- the fake, checked by librouteros --------------------------------------------------------

async def test_librouteros_logs_in_both_ways_and_drives_the_fake(api: RouterOsApiFake) -> None:
    router = api.router
    router.add("ppp/secret", name="alice")
    router.add("ppp/secret", name="bob", disabled="true")
    router.add("ppp/secret", name="carol")
    login = async_plain if api.login == "plain" else async_token
    client = await async_connect("127.0.0.1", USER, PASSWORD, port=port_of(api), login_method=login)
    try:
        secrets = client.path("ppp", "secret")
        names = [r["name"] async for r in secrets.select(Key("name"), Key("disabled"))
                 .where(Key("name").In("alice", "bob"))]
        assert names == ["alice", "bob"]
        [bob] = [r async for r in secrets.select(Key(".id"), Key("disabled")).where(Key("name") == "bob")]
        assert bob["disabled"] is True  # librouteros reads "true" as a boolean
        await secrets.update(**{".id": bob[".id"], "disabled": "no"})
        assert router.find("ppp/secret", name="bob")[0]["disabled"] == "false"
        lists = client.path("ip", "firewall", "address-list")
        new_id = await lists.add(list="blocked", address="10.0.0.7", comment="x")
        assert router.find("ip/firewall/address-list", address="10.0.0.7")[0][".id"] == new_id
        await lists.remove(new_id)
        with pytest.raises(TrapError, match="no such item"):
            await lists.remove(new_id)
        not_carol = [r["name"] async for r in secrets.select(Key("name")).where(Key("name") != "carol")]
        assert not_carol == ["alice", "bob"]
        with pytest.raises(FatalError, match="session terminated on request"):
            [r async for r in client("/quit")]
    finally:
        await client.close()


async def test_librouteros_is_refused_a_wrong_password(api: RouterOsApiFake) -> None:
    login = async_plain if api.login == "plain" else async_token
    with pytest.raises(TrapError):
        await async_connect("127.0.0.1", USER, "wrong", port=port_of(api), login_method=login)


# -- the driver over the API -----------------------------------------------------------------

async def test_off_ends_the_live_session_and_on_enables_over_the_api(api: RouterOsApiFake,
                                                                     driver: RouterOsDriver) -> None:
    router = api.router
    router.add("ppp/secret", name="alice")
    router.connect("alice")
    router.connect("bob")
    await driver.apply(dev(api), "ppp/secret/alice", "off")
    assert router.find("ppp/secret", name="alice")[0]["disabled"] == "true"
    assert router.find("ppp/active", name="alice") == [] and len(router.find("ppp/active", name="bob")) == 1
    assert await driver.read(dev(api), "ppp/secret/alice") == "off"
    await driver.apply(dev(api), "ppp/secret/alice", "on")
    assert await driver.read(dev(api), "ppp/secret/alice") == "on"
    assert (api.connections, api.logins) == (1, 1), "one connection per device, kept between operations"
    assert ["/ppp/secret/print", "=.proplist=.id,name,disabled", "?name=alice"] in api.commands


async def test_every_service_kind_over_the_api(api: RouterOsApiFake, driver: RouterOsDriver) -> None:
    router = api.router
    router.add("ip/hotspot/user", name="room12")
    router.connect("room12", "ip/hotspot/active")
    router.add("interface", name="ether5")
    router.add("queue/simple", name="cust-42", disabled="true")
    router.add("ip/firewall/address-list", list="blocked", address="10.0.0.8", comment="operator")
    d = dev(api)
    await driver.apply(d, "ip/hotspot/user/room12", "off")
    assert router.find("ip/hotspot/active", user="room12") == []
    await driver.apply(d, "interface/ether5", "off")
    await driver.apply(d, "queue/simple/cust-42", "on")
    key = "ip/firewall/address-list/blocked/10.0.0.7"
    await driver.apply(d, key, "off")
    [ours] = router.find("ip/firewall/address-list", address="10.0.0.7")
    assert ours["comment"] == COMMENT
    assert await driver.read_many(d, ["ip/hotspot/user/room12", "interface/ether5", "queue/simple/cust-42", key]) == {
        "ip/hotspot/user/room12": "off", "interface/ether5": "off", "queue/simple/cust-42": "on", key: "off"}
    await driver.apply(d, key, "on")
    assert router.find("ip/firewall/address-list", address="10.0.0.7") == []
    with pytest.raises(PermanentError, match="manage_foreign_entries"):
        await driver.apply(d, "ip/firewall/address-list/blocked/10.0.0.8", "on")


async def test_a_reboot_drops_the_connection_and_the_next_read_reconnects(api: RouterOsApiFake,
                                                                          driver: RouterOsDriver) -> None:
    router = api.router
    old = router.add("ppp/secret", name="alice")[".id"]
    await driver.apply(dev(api), "ppp/secret/alice", "off")
    router.reboot()  # every .id changes and the API connection is closed
    await driver.apply(dev(api), "ppp/secret/alice", "on")
    new = router.find("ppp/secret", name="alice")[0]
    assert new[".id"] != old and new["disabled"] == "false"
    assert api.commands[-1][:2] == ["/ppp/secret/set", f"=.id={new['.id']}"]
    assert api.connections == 2


async def test_fatal_is_transient_and_the_next_call_opens_a_new_session(api: RouterOsApiFake,
                                                                        driver: RouterOsDriver) -> None:
    api.router.add("interface", name="ether1")
    assert await driver.read(dev(api), "interface/ether1") == "on"
    api.fatal_next = "out of memory"
    with pytest.raises(TransientError, match="ended the API session: out of memory"):
        await driver.read(dev(api), "interface/ether1")
    assert await driver.read(dev(api), "interface/ether1") == "on"
    assert api.connections == 2


async def test_traps_map_to_what_the_agent_should_do(api: RouterOsApiFake, driver: RouterOsDriver) -> None:
    router = api.router
    router.add("ppp/secret", name="alice")
    router.connect("alice")
    api.traps.append(("/ppp/active/remove", "no such item", "0"))  # the session ended meanwhile
    await driver.apply(dev(api), "ppp/secret/alice", "off")
    assert router.find("ppp/secret", name="alice")[0]["disabled"] == "true"
    api.traps.append(("*", "not enough permissions (9)", "0"))
    with pytest.raises(ConfigError, match="api, read and write policies"):
        await driver.apply(dev(api), "ppp/secret/alice", "on")
    api.traps.append(("/ip/hotspot/user/print", "no such command prefix", "0"))  # no hotspot package
    with pytest.raises(PermanentError, match="no such command prefix"):
        await driver.read(dev(api), "ip/hotspot/user/u1")
    api.traps.append(("*", "interrupted", "2"))
    with pytest.raises(TransientError, match="interrupted"):
        await driver.read(dev(api), "ppp/secret/alice")
    assert api.connections == 1, "a trap leaves the connection usable"
    with pytest.raises(PermanentError, match="no ppp/secret item named 'nobody'"):
        await driver.read(dev(api), "ppp/secret/nobody")


async def test_a_refused_login_is_a_config_error_naming_the_causes(api: RouterOsApiFake,
                                                                   driver: RouterOsDriver) -> None:
    with pytest.raises(ConfigError, match="'router-wrong'") as caught:
        await driver.probe(dev(api, credential="router-wrong"))
    text = str(caught.value)
    assert "allowed addresses" in text and "not-the-password" not in text and caught.value.__context__ is None
    assert "api policy" in text


async def test_probe_names_the_protocol_and_version(api: RouterOsApiFake, driver: RouterOsDriver) -> None:
    api.router.version = "6.49.10 (long-term)"
    assert await driver.probe(dev(api)) == "RouterOS 6.49.10 (long-term) over the API (api)"


async def test_replies_in_one_byte_segments_and_the_718_empty_reply(api: RouterOsApiFake,
                                                                    driver: RouterOsDriver) -> None:
    api.router.version = "7.18.2 (stable)"
    for n in range(40):
        api.router.add("ppp/secret", name=f"c{n}", comment="x" * 200)  # two-byte word prefixes
    api.chunk = 1
    services = [f"ppp/secret/c{n}" for n in range(40)]
    assert set((await driver.read_many(dev(api), services)).values()) == {"on"}
    with pytest.raises(PermanentError, match="no ppp/secret item named 'nobody'"):
        await driver.read(dev(api), "ppp/secret/nobody")  # !empty, then !done


async def test_a_reply_past_max_reply_bytes_is_refused(api: RouterOsApiFake, driver: RouterOsDriver) -> None:
    names = [f"{n:03d}" + "x" * 200 for n in range(20)]
    for name in names:
        api.router.add("ppp/secret", name=name)
    services = [f"ppp/secret/{name}" for name in names]
    with pytest.raises(PermanentError, match="max_reply_bytes"):
        await driver.read_many(dev(api, max_reply_bytes=2048), services)
    assert set((await driver.read_many(dev(api), services)).values()) == {"on"}
    await until(lambda: api.open_connections == 1, timeout=5, what="one connection per device")


async def test_what_rest_changed_the_api_sees(context: DriverContext, driver: RouterOsDriver) -> None:
    router = await RouterOsFake(USER, PASSWORD).start()
    api = await RouterOsApiFake(router).start()
    try:
        router.add("queue/simple", name="q1")
        rest = Device("r", "routeros", router.url, credential="router-1", options={"username": USER})
        await driver.apply(rest, "queue/simple/q1", "off")
        assert await driver.read(dev(api), "queue/simple/q1") == "off"
    finally:
        await api.stop()
        await router.stop()


async def test_api_ssl_pins_the_certificate_or_trusts_a_ca(context: DriverContext, driver: RouterOsDriver,
                                                           cert: Cert, tmp_path: Path) -> None:
    api = await RouterOsApiFake(RouterOsFake(USER, PASSWORD)).start(tls=cert)
    try:
        api.router.add("interface", name="ether1")
        assert api.address.startswith("api-ssl://")
        assert await driver.read(dev(api, tls_fingerprint=cert.sha256), "interface/ether1") == "on"
        wrong = self_signed(tmp_path, "other")
        with pytest.raises(ConfigError, match=f"fingerprint {cert.sha256.lower()}"):
            await driver.read(dev(api, tls_fingerprint=wrong.sha256), "interface/ether1")
        with pytest.raises(ConfigError, match="TLS"):
            await driver.read(dev(api, ca_file=str(wrong.cert)), "interface/ether1")
        assert await driver.read(dev(api, ca_file=str(cert.cert)), "interface/ether1") == "on"
        assert api.logins == 2, "no login is sent over an unverified connection"
    finally:
        await api.stop()


def test_api_addresses_get_their_default_ports() -> None:
    from agent.drivers.routeros import parse_base
    assert parse_base("api://10.0.0.1") == "api://10.0.0.1:8728"
    assert parse_base("api-ssl://router.lan") == "api-ssl://router.lan:8729"
    assert parse_base("api://[2001:db8::1]") == "api://[2001:db8::1]:8728"
    assert parse_base("api://10.0.0.1:18728") == "api://10.0.0.1:18728"


async def test_device_test_says_which_protocol_and_version_it_found(context: DriverContext, cert: Cert) -> None:
    from agent.ops.devicetest import as_text, run
    router = await RouterOsFake(USER, PASSWORD).start(tls=cert)
    api = await RouterOsApiFake(router).start()
    try:
        rest = Device("r1", "routeros", router.url, credential="router-1",
                      options={"username": USER, "tls_fingerprint": cert.sha256})
        text = as_text(await run(rest, "r1", None, context))
        assert "PASS  probe: answers" in text and "RouterOS 7.16 (stable) over REST (https)" in text
        router.version = "6.49.10 (long-term)"
        text = as_text(await run(dev(api), "router-1", None, context))
        assert "RouterOS 6.49.10 (long-term) over the API (api)" in text
    finally:
        await api.stop()
        await router.stop()


# -- address lists as RouterOS keeps them, over both protocols --------------------------------

@pytest.fixture(params=["rest", "api"])
async def reached(request: pytest.FixtureRequest) -> AsyncIterator[tuple[RouterOsFake, Device]]:
    """One router, and a device reaching it over REST or over the API."""
    router = await RouterOsFake(USER, PASSWORD).start()
    api = await RouterOsApiFake(router).start()
    address = router.url if request.param == "rest" else api.address
    yield router, Device("router-1", "routeros", address, credential="router-1",
                         options={"username": USER, "timeout": 2.0})
    await api.stop()
    await router.stop()


@pytest.mark.parametrize(("key", "menu", "stored"), [
    ("ip/firewall/address-list/blocked/10.0.0.7/32", "ip/firewall/address-list", "10.0.0.7"),
    ("ip/firewall/address-list/blocked/2001:DB8:0::7", "ipv6/firewall/address-list", "2001:db8::7/128"),
    ("ipv6/firewall/address-list/blocked/2001:db8::8/128", "ipv6/firewall/address-list", "2001:db8::8/128"),
])
async def test_address_lists_find_the_entry_the_router_stores(reached: tuple[RouterOsFake, Device],
                                                              driver: RouterOsDriver, key: str, menu: str,
                                                              stored: str) -> None:
    router, d = reached
    for _ in range(2):  # the second off must find the first one's entry, not add another ("already have")
        await driver.apply(d, key, "off")
        assert [e["comment"] for e in router.find(menu, list="blocked", address=stored)] == [COMMENT]
        assert await driver.read(d, key) == "off"
    await driver.apply(d, key, "on")
    assert router.find(menu, list="blocked") == [] and await driver.read(d, key) == "on"


async def test_an_operators_disabled_entry_does_not_fail_the_suspension(reached: tuple[RouterOsFake, Device],
                                                                        driver: RouterOsDriver) -> None:
    router, d = reached
    menu, key = "ip/firewall/address-list", "ip/firewall/address-list/blocked/10.0.0.7"
    router.add(menu, list="blocked", address="10.0.0.7", comment="late payer 2024", disabled="true")
    await driver.apply(d, key, "off")
    [entry] = router.find(menu, list="blocked")
    assert (entry["disabled"], entry["comment"]) == ("false", f"late payer 2024 [{COMMENT}]")
    assert await driver.read(d, key) == "off"
    await driver.apply(d, key, "on")
    [entry] = router.find(menu, list="blocked")
    assert (entry["disabled"], entry["comment"]) == ("true", "late payer 2024"), "given back as it was"
    assert await driver.read(d, key) == "on"


@pytest.mark.parametrize("protocol", ["rest", "api"])
async def test_a_certificate_with_only_the_routers_name_is_checked_against_tls_server_name(
        context: DriverContext, driver: RouterOsDriver, tmp_path: Path, protocol: str) -> None:
    cert = self_signed(tmp_path, "router.isp.example", host=None)  # common name only, no IP: RouterOS's usual
    router = await RouterOsFake(USER, PASSWORD).start(tls=cert)
    api = await RouterOsApiFake(router).start(tls=cert)
    try:
        router.add("interface", name="ether1")
        address = router.url if protocol == "rest" else api.address

        def trusted(**options: Any) -> Device:
            return Device("r", "routeros", address, credential="router-1",
                          options={"username": USER, "ca_file": str(cert.cert), "timeout": 2.0, **options})

        with pytest.raises(ConfigError, match="set tls_server_name to that name"):
            await driver.read(trusted(), "interface/ether1")
        assert await driver.read(trusted(tls_server_name="router.isp.example"), "interface/ether1") == "on"
        with pytest.raises(ConfigError, match="TLS"):
            await driver.read(trusted(tls_server_name="other.isp.example"), "interface/ether1")
    finally:
        await api.stop()
        await router.stop()


async def test_the_interface_the_agent_reaches_the_router_through_is_not_turned_off(
        reached: tuple[RouterOsFake, Device], driver: RouterOsDriver) -> None:
    router, d = reached  # the agent reaches the router at 127.0.0.1
    for name in ("ether1", "ether2", "ether3", "ether4"):
        router.add("interface", name=name)
    router.add("ip/address", address="127.0.0.1/8", interface="ether1")
    with pytest.raises(PermanentError, match="would cut the agent off from the router"):
        await driver.apply(d, "interface/ether1", "off")
    router.tables["ip/address"][0]["interface"] = "bridge1"
    router.add("interface/bridge/port", interface="ether3", bridge="bridge1")
    with pytest.raises(PermanentError, match=r"on 'bridge1' \(carried by 'ether3'\)"):
        await driver.apply(d, "interface/ether3", "off")
    router.tables["ip/address"][0]["interface"] = "vlan10"
    router.add("interface/vlan", name="vlan10", interface="ether4")
    with pytest.raises(PermanentError, match="would cut the agent off"):
        await driver.apply(d, "interface/ether4", "off")
    assert {r["name"]: r["disabled"] for r in router.tables["interface"]} == {
        "ether1": "false", "ether2": "false", "ether3": "false", "ether4": "false"}
    await driver.apply(d, "interface/ether2", "off")  # another port: nothing to do with the agent's way in
    await driver.apply(d, "interface/ether1", "off")  # the address is on vlan10 over ether4 now
    assert router.find("interface", name="ether2")[0]["disabled"] == "true"


async def test_address_lists_no_enabled_firewall_rule_uses_are_reported(reached: tuple[RouterOsFake, Device],
                                                                       driver: RouterOsDriver) -> None:
    router, d = reached
    known = ["ip/firewall/address-list/blocked/10.0.0.7", "ip/firewall/address-list/late/10.0.0.8",
             "ipv6/firewall/address-list/blocked6/2001:db8::7", "ppp/secret/alice"]
    router.add("ip/firewall/filter", chain="forward", action="drop", src_address_list="blocked")
    router.add("ip/firewall/nat", chain="dstnat", action="dst-nat", src_address_list="late", disabled="true")
    router.add("ipv6/firewall/raw", chain="prerouting", action="drop", dst_address_list="!blocked6")
    problems = await driver.check_policy(d, known)
    assert len(problems) == 1 and "'late'" in problems[0] and "blocks nobody" in problems[0]
    router.find("ip/firewall/nat", chain="dstnat")[0]["disabled"] = "false"
    assert await driver.check_policy(d, known) == []
    option = Device(d.id, d.driver, d.address, credential=d.credential,
                    options={**d.options, "address_lists": "blocked, suspended"})
    [problem] = await driver.check_policy(option, [])
    assert "'suspended'" in problem


async def test_device_test_fails_naming_a_list_no_rule_uses(reached: tuple[RouterOsFake, Device],
                                                           context: DriverContext) -> None:
    from agent.ops.devicetest import POLICY, as_text, run
    router, d = reached
    known = ["ip/firewall/address-list/blocked/10.0.0.7"]
    result = await run(d, d.id, None, context, known)
    text = as_text(result)
    assert not result.ok and f"FAIL  {POLICY}: config: address list 'blocked' is used by no enabled" in text
    assert "fix: add an enabled firewall rule" in text
    router.add("ip/firewall/raw", chain="prerouting", action="drop", src_address_list="blocked")
    result = await run(d, d.id, None, context, known)
    assert result.ok, as_text(result)


async def test_a_service_that_closes_at_once_points_at_its_allowed_addresses(driver: RouterOsDriver) -> None:
    import asyncio

    async def close_at_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()  # as RouterOS does when /ip service api address= leaves this host out

    server = await asyncio.start_server(close_at_once, "127.0.0.1", 0)
    try:
        address = f"api://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        with pytest.raises(TransientError, match=r"api service allows this host \(`/ip service print`"):
            await driver.probe(Device("r", "routeros", address, credential="router-1", options={"username": USER}))
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("protocol", ["rest", "api"])
async def test_an_ipv6_list_used_only_by_an_ipv6_nat_rule_is_in_use(driver: RouterOsDriver, protocol: str) -> None:
    """RouterOS 7.1 and later have /ipv6/firewall/nat (a walled garden redirects with dst-nat)."""
    router = await RouterOsFake(USER, PASSWORD).start()
    api = await RouterOsApiFake(router).start()
    try:
        d = Device("r", "routeros", router.url if protocol == "rest" else api.address, credential="router-1",
                   options={"username": USER, "timeout": 2.0})
        known = ["ipv6/firewall/address-list/portal6/2001:db8::7"]
        router.add("ipv6/firewall/nat", chain="dstnat", action="redirect", src_address_list="portal6")
        assert await driver.check_policy(d, known) == []
        router.find("ipv6/firewall/nat", chain="dstnat")[0]["disabled"] = "true"
        [problem] = await driver.check_policy(d, known)
        assert "'portal6'" in problem and "/ipv6/firewall rule (filter, nat, mangle or raw" in problem
    finally:
        await api.stop()
        await router.stop()


async def test_a_v6_router_without_ipv6_nat_is_checked_over_its_other_tables(api: RouterOsApiFake,
                                                                              driver: RouterOsDriver) -> None:
    api.router.version = "6.49.10 (long-term)"  # no /ipv6/firewall/nat: "no such command prefix"
    known = ["ipv6/firewall/address-list/blocked6/2001:db8::7"]
    [problem] = await driver.check_policy(dev(api), known)
    assert "'blocked6'" in problem
    api.router.add("ipv6/firewall/filter", chain="forward", action="drop", src_address_list="blocked6")
    assert await driver.check_policy(dev(api), known) == []
    assert ["/ipv6/firewall/nat/print", "=.proplist=src-address-list,dst-address-list,disabled"] in api.commands
