"""The `routeros` driver against the fake RouterOS REST service (tests/support/routeros_fake.py),
written from MikroTik's documentation: fake-backed, not proof against a router."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from agent.drivers.base import CredentialStore, DriverContext
from agent.drivers.routeros import COMMENT, RouterOsDriver
from agent.errors import ConfigError, PermanentError, TransientError
from agent.model.device import Device
from tests.support.routeros_fake import Cert, RouterOsFake, self_signed

pytestmark = pytest.mark.fake_backed
USER, PASSWORD = "agent", "pw-Router-9d2c4a"
AUTH = {"Authorization": "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()}


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> Cert:
    return self_signed(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def context(tmp_path_factory: pytest.TempPathFactory) -> DriverContext:
    creds = tmp_path_factory.mktemp("credentials")
    (creds / "router-1").write_text(PASSWORD + "\n")
    (creds / "router-wrong").write_text("not-the-password\n")
    return DriverContext(device_timeout=5.0, credentials=CredentialStore(creds))


@pytest.fixture
async def router(cert: Cert) -> AsyncIterator[RouterOsFake]:
    fake = await RouterOsFake(USER, PASSWORD).start(tls=cert)
    yield fake
    await fake.stop()


@pytest.fixture
async def driver(context: DriverContext) -> AsyncIterator[RouterOsDriver]:
    d = RouterOsDriver(context)
    yield d
    await d.close()


def pinned(router: RouterOsFake, cert: Cert, credential: str = "router-1", **options: Any) -> Device:
    return Device("router-1", "routeros", router.url, credential=credential,
                  options={"username": USER, "tls_fingerprint": cert.sha256, "timeout": 2.0, **options})


async def test_off_ends_the_live_session_that_disabling_leaves_up(router: RouterOsFake, cert: Cert,
                                                                  driver: RouterOsDriver) -> None:
    router.add("ppp/secret", name="alice")
    router.connect("alice")
    router.connect("bob")
    dev = pinned(router, cert)
    await driver.apply(dev, "ppp/secret/alice", "off")
    assert router.find("ppp/secret", name="alice")[0]["disabled"] == "true"
    assert router.find("ppp/active", name="alice") == [] and len(router.find("ppp/active", name="bob")) == 1
    assert await driver.read(dev, "ppp/secret/alice") == "off"
    await driver.apply(dev, "ppp/secret/alice", "on")
    assert router.find("ppp/secret", name="alice")[0]["disabled"] == "false"


async def test_a_disabled_secret_with_a_session_still_up_reads_on(router: RouterOsFake, cert: Cert,
                                                                  driver: RouterOsDriver) -> None:
    router.add("ppp/secret", name="alice", disabled="true")
    router.connect("alice")  # disabled behind the agent's back: the customer is still online
    dev = pinned(router, cert)
    assert await driver.read(dev, "ppp/secret/alice") == "on"
    await driver.apply(dev, "ppp/secret/alice", "off")
    assert router.find("ppp/active", name="alice") == []
    assert not any(m == "PATCH" for m, _, _ in router.requests), "the secret was disabled already"


async def test_hotspot_off_ends_the_session_of_that_user(router: RouterOsFake, cert: Cert,
                                                         driver: RouterOsDriver) -> None:
    router.add("ip/hotspot/user", name="room12")
    router.connect("room12", "ip/hotspot/active")
    dev = pinned(router, cert)
    assert await driver.read(dev, "ip/hotspot/user/room12") == "on"
    await driver.apply(dev, "ip/hotspot/user/room12", "off")
    assert router.find("ip/hotspot/user", name="room12")[0]["disabled"] == "true"
    assert router.find("ip/hotspot/active", user="room12") == []


async def test_interface_and_queue_follow_disabled(router: RouterOsFake, cert: Cert, driver: RouterOsDriver) -> None:
    router.add("interface", name="ether5")
    router.add("queue/simple", name="cust-42", disabled="true")
    dev = pinned(router, cert)
    await driver.apply(dev, "interface/ether5", "off")
    assert router.find("interface", name="ether5")[0]["running"] == "false"
    await driver.apply(dev, "queue/simple/cust-42", "on")
    assert router.find("queue/simple", name="cust-42")[0]["disabled"] == "false"
    assert await driver.read_many(dev, ["interface/ether5", "queue/simple/cust-42"]) == {
        "interface/ether5": "off", "queue/simple/cust-42": "on"}


async def test_address_list_entries_are_marked_and_only_ours_are_removed(router: RouterOsFake, cert: Cert,
                                                                         driver: RouterOsDriver) -> None:
    key, dev = "ip/firewall/address-list/blocked/10.0.0.7", pinned(router, cert)
    router.add("ip/firewall/address-list", list="blocked", address="10.0.0.8", comment="operator")
    await driver.apply(dev, key, "off")
    [ours] = router.find("ip/firewall/address-list", address="10.0.0.7")
    assert (ours["list"], ours["comment"]) == ("blocked", COMMENT)
    await driver.apply(dev, key, "off")  # idempotent: no second entry
    assert len(router.find("ip/firewall/address-list", address="10.0.0.7")) == 1
    await driver.apply(dev, key, "on")
    assert router.find("ip/firewall/address-list", address="10.0.0.7") == []
    assert len(router.find("ip/firewall/address-list", address="10.0.0.8")) == 1


async def test_foreign_entries_are_refused_unless_managed(router: RouterOsFake, cert: Cert,
                                                          driver: RouterOsDriver) -> None:
    key = "ip/firewall/address-list/blocked/10.0.0.8"
    router.add("ip/firewall/address-list", list="blocked", address="10.0.0.8", comment="operator")
    with pytest.raises(PermanentError, match="manage_foreign_entries"):
        await driver.apply(pinned(router, cert), key, "on")
    assert len(router.find("ip/firewall/address-list", address="10.0.0.8")) == 1
    await driver.apply(pinned(router, cert, manage_foreign_entries=True), key, "on")
    assert router.find("ip/firewall/address-list", address="10.0.0.8") == []


async def test_ids_are_looked_up_again_after_a_reboot(router: RouterOsFake, cert: Cert,
                                                      driver: RouterOsDriver) -> None:
    old = router.add("ppp/secret", name="alice")[".id"]
    dev = pinned(router, cert)
    await driver.apply(dev, "ppp/secret/alice", "off")
    router.reboot()
    assert router.find("ppp/secret", name="alice")[0][".id"] != old
    await driver.apply(dev, "ppp/secret/alice", "on")
    patched = [path for method, path, _ in router.requests if method == "PATCH"]
    assert patched[-1] == f"/rest/ppp/secret/{router.find('ppp/secret', name='alice')[0]['.id']}"
    async with aiohttp.ClientSession() as http:  # the old .id is gone on the router
        async with http.patch(f"{router.url}/rest/ppp/secret/{old}", json={"disabled": "true"}, ssl=False,
                              headers=AUTH) as resp:
            assert (resp.status, await resp.json()) == (404, {"error": 404, "message": "Not Found"})


async def test_missing_objects_are_permanent_and_named(router: RouterOsFake, cert: Cert,
                                                       driver: RouterOsDriver) -> None:
    dev = pinned(router, cert)
    with pytest.raises(PermanentError, match="no ppp/secret item named 'nobody'"):
        await driver.read(dev, "ppp/secret/nobody")
    with pytest.raises(PermanentError, match="no interface item named 'ether99'"):
        await driver.apply(dev, "interface/ether99", "off")


async def test_a_session_that_ended_meanwhile_is_not_an_error(router: RouterOsFake, cert: Cert,
                                                              driver: RouterOsDriver) -> None:
    router.add("ppp/secret", name="alice")
    router.connect("alice")
    router.inject.append(("DELETE", web.json_response({"error": 404, "message": "Not Found"}, status=404)))
    await driver.apply(pinned(router, cert), "ppp/secret/alice", "off")
    assert router.find("ppp/secret", name="alice")[0]["disabled"] == "true"


async def test_many_reads_take_one_print_per_menu(router: RouterOsFake, cert: Cert, driver: RouterOsDriver) -> None:
    for name in ("a", "b", "c"):
        router.add("ppp/secret", name=name, disabled="true" if name == "b" else "false")
    router.add("interface", name="ether2")
    states = await driver.read_many(pinned(router, cert), ["ppp/secret/a", "ppp/secret/b", "ppp/secret/c",
                                                           "interface/ether2"])
    assert states == {"ppp/secret/a": "on", "ppp/secret/b": "off", "ppp/secret/c": "on", "interface/ether2": "on"}
    assert sorted(path for _, path, _ in router.requests) == [
        "/rest/interface/print", "/rest/ppp/active/print", "/rest/ppp/secret/print"]


async def test_tls_pin_and_ca(router: RouterOsFake, cert: Cert, driver: RouterOsDriver, tmp_path: Path) -> None:
    router.add("interface", name="ether1")
    wrong = self_signed(tmp_path, "other")
    with pytest.raises(ConfigError, match=f"fingerprint {cert.sha256.lower()}"):
        await driver.read(pinned(router, wrong), "interface/ether1")
    unpinned = Device("router-1", "routeros", router.url, credential="router-1", options={"username": USER})
    with pytest.raises(ConfigError, match="tls_fingerprint or name its CA"):
        await driver.read(unpinned, "interface/ether1")
    assert router.requests == [], "no request may be sent over an unverified connection"
    trusted = Device("router-1", "routeros", router.url, credential="router-1",
                     options={"username": USER, "ca_file": str(cert.cert)})
    assert await driver.read(trusted, "interface/ether1") == "on"


async def test_plain_http_when_the_operator_chose_it(context: DriverContext, driver: RouterOsDriver) -> None:
    fake = await RouterOsFake(USER, PASSWORD).start()
    try:
        fake.add("queue/simple", name="q1")
        dev = Device("r", "routeros", fake.url, credential="router-1", options={"username": USER})
        await driver.apply(dev, "queue/simple/q1", "off")
        assert fake.find("queue/simple", name="q1")[0]["disabled"] == "true"
    finally:
        await fake.stop()


async def test_wrong_password_is_a_config_error_naming_the_credential(router: RouterOsFake, cert: Cert,
                                                                      driver: RouterOsDriver) -> None:
    with pytest.raises(ConfigError, match="'router-wrong'") as caught:
        await driver.probe(pinned(router, cert, credential="router-wrong"))
    assert "not-the-password" not in str(caught.value) and caught.value.__context__ is None
    await driver.probe(pinned(router, cert))


@pytest.mark.parametrize(("canned", "kind", "match"), [
    (web.json_response({"error": 503, "message": "Service Unavailable"}, status=503), TransientError, "503"),
    (web.Response(status=301, headers={"Location": "https://evil.example/rest"}), PermanentError, "evil.example"),
    (web.json_response([{"name": "x" * 4000}]), PermanentError, "max_reply_bytes"),
    (web.Response(text="garbage, not JSON"), PermanentError, "not JSON"),
    # RouterOS v6 (no /rest): WebFig answers with its HTML page, or a 404 page
    (web.Response(text="<!DOCTYPE html><html><title>RouterOS router configuration page</title>",
                  content_type="text/html"), ConfigError, r"no REST API \(RouterOS v6\?\): use api://127.0.0.1"),
    (web.Response(status=404, text="<html>Not Found</html>", content_type="text/html"), ConfigError,
     "no REST API"),
])
async def test_bad_answers_map_once(router: RouterOsFake, cert: Cert, driver: RouterOsDriver,
                                    canned: web.Response, kind: type, match: str) -> None:
    router.inject.append(("*", canned))
    with pytest.raises(kind, match=match):
        await driver.read(pinned(router, cert, max_reply_bytes=2048), "ppp/secret/alice")
    assert len(router.requests) == 1, "a redirect is not followed"


async def test_control_bytes_and_other_encodings_in_a_reply_are_read_not_refused(router: RouterOsFake, cert: Cert,
                                                                                 driver: RouterOsDriver) -> None:
    # RouterOS puts a comment's raw bytes into its JSON: control characters unescaped, Latin-1 as it was typed
    raw = b'[{".id":"*1","name":"alice","disabled":"true","comment":"caf\xe9 \x01\x1b[2J\tcust"}]'
    router.inject.append(("POST", web.Response(body=raw, content_type="application/json")))
    assert await driver.read(pinned(router, cert), "ppp/secret/alice") == "off"


async def test_a_read_whose_connection_closes_unanswered_is_sent_again_and_a_write_is_not(
        router: RouterOsFake, cert: Cert, driver: RouterOsDriver, monkeypatch: pytest.MonkeyPatch) -> None:
    router.add("ppp/secret", name="alice")
    router.drop = 1  # RouterOS closes a kept-alive connection as it is reused
    assert await driver.read(pinned(router, cert), "ppp/secret/alice") == "on"
    assert [p for _, p, _ in router.requests].count("/rest/ppp/secret/print") == 2
    dispatch = router._dispatch

    def drop_after_reading(method: str, tail: str, body: Any, request: web.Request) -> web.StreamResponse:
        if tail == "ppp/active/print":
            router.drop = 1  # the request after the reads, the PATCH, goes unanswered
        return dispatch(method, tail, body, request)

    monkeypatch.setattr(router, "_dispatch", drop_after_reading)
    with pytest.raises(TransientError):
        await driver.apply(pinned(router, cert), "ppp/secret/alice", "off")
    assert [m for m, _, _ in router.requests].count("PATCH") == 1, "a write is not sent twice"


async def test_fake_evaluates_the_documented_query_stack(router: RouterOsFake) -> None:
    for name, kind in (("ether1", "ether"), ("vlan10", "vlan"), ("br0", "bridge")):
        router.add("interface", name=name, type=kind)
    async with aiohttp.ClientSession() as http:
        # POST /rest/interface/print {".query":["type=ether","type=vlan","#|!"]}: neither ether nor vlan
        async with http.post(f"{router.url}/rest/interface/print", ssl=False, headers=AUTH,
                             json={".proplist": "name,type", ".query": ["type=ether", "type=vlan", "#|!"]}) as resp:
            assert await resp.json() == [{"name": "br0", "type": "bridge"}]
        async with http.delete(f"{router.url}/rest/interface/ether1", ssl=False,
                               headers=AUTH) as resp:
            assert await resp.json() == {"error": 406, "message": "Not Acceptable",
                                         "detail": "no such command or directory (remove)"}


async def test_rest_reuses_a_fresh_connection_but_not_one_idle_past_the_keepalive_limit(
        router: RouterOsFake, cert: Cert, context: DriverContext, monkeypatch: pytest.MonkeyPatch) -> None:
    """One TLS connection serves a device's requests while fresh (a new one per request would cost the
    router a handshake each); RouterOS may drop, or answer stale on, one reused late: past KEEPALIVE
    the driver opens a new one (aiohttp's default keeps it 15 s)."""
    from agent.drivers import routeros as routeros_module
    from tests.support.wait import until

    assert routeros_module.KEEPALIVE <= 5, "a short time: aiohttp's default of 15 s is what RouterOS answers stale on"
    monkeypatch.setattr(routeros_module, "KEEPALIVE", 0.3)
    router.add("ppp/secret", name="alice", disabled="false")
    d = RouterOsDriver(context)
    try:
        dev = pinned(router, cert)
        await d.read(dev, "ppp/secret/alice")
        await d.read(dev, "ppp/secret/alice")
        assert len(router.peers) >= 2 and len(set(router.peers)) == 1  # one connection while fresh
        connector = d._session.connector  # type: ignore[union-attr]
        await until(lambda: not connector._conns, timeout=10, what="the idle connection closed by the driver")
        await d.read(dev, "ppp/secret/alice")
        assert len(set(router.peers)) == 2
    finally:
        await d.close()
