"""The http driver against a simulated RouterOS-like device on 127.0.0.1."""

from __future__ import annotations

import asyncio
import socket

import pytest

from agent.drivers.base import CredentialStore, DriverContext
from agent.drivers.http import HttpDriver, classify_status, render_body, render_path, resolve_pointer, to_state
from agent.errors import ConfigError, PermanentError, TransientError, UnreachableError
from agent.executor.converge import observe_for_take, observe_many
from agent.executor.deadlines import Deadlines
from agent.model.device import Device
from tests.support.httpdevice import HttpDevice

ROUTEROS = {"read_path": "/rest/ppp/secret/{service}", "set_method": "PATCH", "state_pointer": "/disabled",
            "on_value": "false", "off_value": "true", "set_body": {"disabled": "{value}"}}


@pytest.fixture
async def box():
    dev = await HttpDevice().start()
    dev.secrets = {"alice": "true", "a b": "false"}
    yield dev
    await dev.stop()


@pytest.fixture
async def driver():
    d = HttpDriver(DriverContext(device_timeout=2))
    yield d
    await d.close()


def router(box: HttpDevice, **options) -> Device:
    return Device("r1", "http", f"127.0.0.1:{box.port}", options={**ROUTEROS, **options})


async def test_set_then_read_back_with_string_values(box, driver):
    dev = router(box)
    assert await driver.read(dev, "alice") == "off"
    await driver.apply(dev, "alice", "on")
    assert box.secrets["alice"] == "false"
    assert await driver.read(dev, "alice") == "on"
    assert ("PATCH", "/rest/ppp/secret/alice") in box.requests


async def test_service_names_are_quoted_into_the_path(box, driver):
    box.secrets["a+b@c"] = "false"
    assert await driver.read(router(box), "a+b@c") == "on"
    assert ("GET", "/rest/ppp/secret/a%2Bb@c") in box.requests  # + quoted; @ is a legal path character


async def test_a_service_key_outside_the_syntax_is_refused_before_any_request(box, driver):
    with pytest.raises(PermanentError, match="does not match"):
        await driver.read(router(box), "../../admin")
    assert box.requests == []


@pytest.mark.parametrize("status, error", [(503, TransientError), (429, TransientError), (404, PermanentError),
                                           (400, PermanentError)])
async def test_http_errors_map_to_error_kinds(box, driver, status, error):
    box.fail = [status]
    with pytest.raises(error, match=f"HTTP {status}"):
        await driver.apply(router(box), "alice", "on")


async def test_timeout_is_transient(box, driver):
    box.delay = 1.0
    with pytest.raises(TransientError, match=r"timed out after 0\.2s"):
        await driver.read(router(box, timeout=0.2), "alice")


async def test_connection_refused_is_unreachable(driver):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dev = Device("r1", "http", f"127.0.0.1:{port}", options=ROUTEROS)
    with pytest.raises(UnreachableError):
        await driver.read(dev, "alice")
    with pytest.raises(UnreachableError):
        await driver.probe(dev)


async def test_probe_connects(box, driver):
    await driver.probe(router(box))


async def test_pointer_that_does_not_resolve_is_permanent(box, driver):
    with pytest.raises(PermanentError, match="state_pointer '/enabled' not found"):
        await driver.read(router(box, state_pointer="/enabled"), "alice")


async def test_value_that_is_neither_on_nor_off_is_permanent(box, driver):
    box.secrets["alice"] = "maybe"
    with pytest.raises(PermanentError, match="neither on_value nor off_value"):
        await driver.read(router(box), "alice")


async def test_basic_auth_from_a_named_credential_never_leaks(box, tmp_path, monkeypatch):
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    (tmp_path / "r1-admin").write_text('{"username": "api", "password": "s3cr3t-pw"}')
    driver = HttpDriver(DriverContext(2, CredentialStore(tmp_path)))
    dev = Device("r1", "http", f"127.0.0.1:{box.port}", options=ROUTEROS, credential="r1-admin")
    try:
        await driver.read(dev, "alice")
        assert box.auth[-1] is not None and box.auth[-1].startswith("Basic ")
        box.fail = [401]
        with pytest.raises(ConfigError, match="refused credential 'r1-admin'") as err:
            await driver.read(dev, "alice")
        assert "s3cr3t-pw" not in str(err.value) and "api" not in str(err.value).split(":")[0]
    finally:
        await driver.close()


@pytest.mark.parametrize("options, message", [
    ({"read_path": None}, "read_path is required"),
    ({"set_method": "BREW"}, "set_method"),
    ({"headers": {"X": 1}}, "headers"),
    ({"timeout": -1}, "timeout"),
    ({"on_value": "x", "off_value": "x"}, "must differ"),
])
def test_bad_options_are_refused(options, message):
    dev = Device("r1", "http", "10.0.0.1", options={**ROUTEROS, **options})
    with pytest.raises(ConfigError, match=message):
        HttpDriver().validate_options(dev)


def test_body_template_keeps_json_types():
    template = {"cfg": {"enabled": "{value}", "note": "set by agent for {device}/{service}"}, "list": ["{value}"]}
    assert render_body(template, True, "r1", "wifi") == {
        "cfg": {"enabled": True, "note": "set by agent for r1/wifi"}, "list": [True]}


def test_pointer_and_value_mapping():
    doc = {"a": [{"b~c/d": 1}]}
    assert resolve_pointer(doc, "/a/0/b~0c~1d") == 1
    assert to_state(1, True, False) is None  # 1 is not true in JSON
    assert to_state(True, True, False) == "on" and to_state(0, 1, 0) == "off"
    assert render_path("/x/{device}/{service}", "r 1", "p/q") == "/x/r%201/p%2Fq"


def test_status_classification():
    classify_status(204, "x", "")
    with pytest.raises(TransientError):
        classify_status(502, "x", "")
    with pytest.raises(ConfigError, match="HTTP 403: forbidden"):
        classify_status(403, "x", "forbidden")
    with pytest.raises(PermanentError, match="redirect to http://elsewhere/: not followed"):
        classify_status(302, "x", "", "http://elsewhere/")


async def test_list_path_reads_many_services_in_one_request(aiohttp_server):
    from aiohttp import web

    hits: list[str] = []

    async def secrets(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.json_response([{"name": "alice", "disabled": "false"}, {"name": "bob", "disabled": "true"},
                                  {"name": "eve", "disabled": "maybe"}])

    app = web.Application()
    app.router.add_get("/rest/ppp/secret", secrets)
    server = await aiohttp_server(app)
    dev = Device("r1", "http", f"127.0.0.1:{server.port}", options={
        "read_path": "/rest/ppp/secret/{service}", "list_path": "/rest/ppp/secret", "list_key": "/name",
        "state_pointer": "/disabled", "on_value": "false", "off_value": "true"})
    driver = HttpDriver()
    try:
        got = await driver.read_many(dev, ["alice", "bob", "carol", "eve", "../x"])
    finally:
        await driver.close()
    assert hits == ["/rest/ppp/secret"]  # one request for all of them
    assert (got["alice"], got["bob"]) == ("on", "off")
    assert isinstance(got["carol"], PermanentError) and "no item for carol" in str(got["carol"])
    assert isinstance(got["eve"], PermanentError) and isinstance(got["../x"], PermanentError)


async def test_a_list_reply_that_cannot_be_used_fails_no_command_each_service_is_read_on_its_own(aiohttp_server):
    """The list is shared by the commands of a take: when its reply is unusable (here cut short, not
    JSON), the agent reads each service on its own, and only a service whose own read fails fails."""
    from aiohttp import web

    hits: list[str] = []
    secrets = {"alice": "false", "bob": "true"}

    async def cut(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.Response(text='[{"name": "alice", "disabled": "fal', content_type="application/json")

    async def one(request: web.Request) -> web.Response:
        hits.append(request.path)
        name = request.match_info["name"]
        if name not in secrets:
            return web.json_response({"error": 404, "message": "no such item"}, status=404)
        return web.json_response({"name": name, "disabled": secrets[name]})

    app = web.Application()
    app.router.add_get("/rest/ppp/secret", cut)
    app.router.add_get("/rest/ppp/secret/{name}", one)
    server = await aiohttp_server(app)
    dev = Device("r1", "http", f"127.0.0.1:{server.port}", options={**ROUTEROS, "list_path": "/rest/ppp/secret",
                                                                   "list_key": "/name"})
    driver, deadlines = HttpDriver(), Deadlines(resolution=0.05)
    watcher = asyncio.create_task(deadlines.run())
    try:
        got = await observe_for_take(driver, dev, ["alice", "bob", "carol"], 2.0, deadlines)
    finally:
        watcher.cancel()
        await driver.close()
    assert hits == ["/rest/ppp/secret", "/rest/ppp/secret/alice", "/rest/ppp/secret/bob", "/rest/ppp/secret/carol"]
    assert (got["alice"].observed, got["bob"].observed) == ("on", "off")  # type: ignore[union-attr]
    assert isinstance(got["carol"], PermanentError) and "404" in str(got["carol"])


async def test_without_a_list_path_each_service_is_read_under_its_own_deadline(box, driver):
    """No list to GET: the agent reads the services one by one, each call with its own deadline,
    so a take of many commands never fails as a whole for the sum of their reads."""
    box.delay = 0.3
    box.secrets = dict.fromkeys("abcde", "true")
    deadlines = Deadlines(resolution=0.05)
    watcher = asyncio.create_task(deadlines.run())
    try:
        got = await observe_many(driver, router(box), list("abcde"), 1.0, deadlines)  # 5 x 0.3 s > 1 s
    finally:
        watcher.cancel()
    assert {s: getattr(o, "observed", o) for s, o in got.items()} == dict.fromkeys("abcde", "off")
    assert not driver.can_read_many(router(box)) and driver.can_read_many(router(box, list_path="/rest/ppp/secret"))
