from __future__ import annotations

import json

import pytest

from agent.drivers.base import CredentialStore
from agent.drivers.sim import SimDriver
from agent.errors import ConfigError, PermanentError, TransientError
from agent.model.device import Device
from agent.ops.admin import parse_option, read_device_file


async def test_sim_remembers_state_per_device_and_service():
    sim = SimDriver()
    dev = Device("r1", "sim")
    await sim.apply(dev, "wifi", "on")
    assert await sim.read(dev, "wifi") == "on" and await sim.read(dev, "lan") == "off"
    assert await sim.read(Device("r2", "sim"), "wifi") == "off"


async def test_sim_state_file_can_be_edited_behind_the_agents_back(tmp_path):
    path = tmp_path / "r1.json"
    dev = Device("r1", "sim", options={"state_file": str(path)})
    sim = SimDriver()
    await sim.apply(dev, "wifi", "on")
    assert json.loads(path.read_text()) == {"wifi": "on"}
    path.write_text(json.dumps({"wifi": "off"}))
    assert await sim.read(dev, "wifi") == "off"


@pytest.mark.parametrize("kind, error", [("transient", TransientError), ("permanent", PermanentError)])
async def test_sim_injects_failures(kind, error):
    dev = Device("r1", "sim", options={"failure_rate": 1.0, "failure_kind": kind})
    with pytest.raises(error):
        await SimDriver().apply(dev, "wifi", "on")


@pytest.mark.parametrize("options, message", [
    ({"failure_rate": 2}, "failure_rate"), ({"latency": "slow"}, "latency"),
    ({"failure_kind": "odd"}, "failure_kind"), ({"colour": 1}, "unknown option"),
])
def test_sim_rejects_bad_options(options, message):
    with pytest.raises(ConfigError, match=message):
        SimDriver().validate_options(Device("r1", "sim", options=options))


def test_option_values_that_parse_as_json_are_json():
    assert parse_option("latency=0.5") == ("latency", 0.5)
    assert parse_option("on_value=true") == ("on_value", True)
    assert parse_option('headers={"X": "1"}') == ("headers", {"X": "1"})
    assert parse_option("read_path=/api/{service}") == ("read_path", "/api/{service}")
    with pytest.raises(ConfigError):
        parse_option("novalue")


def test_device_file_in_toml_and_json(tmp_path):
    toml = tmp_path / "d.toml"
    toml.write_text('[[device]]\nid = "r1"\ndriver = "sim"\n[device.options]\nlatency = 0.1\n')
    js = tmp_path / "d.json"
    js.write_text(json.dumps({"devices": [{"id": "r2", "driver": "sim", "site": "north"}]}))
    [r1] = read_device_file(toml, "default")
    [r2] = read_device_file(js, "default")
    assert (r1.id, r1.options, r1.site) == ("r1", {"latency": 0.1}, "default")
    assert (r2.id, r2.site) == ("r2", "north")


def test_device_file_with_unknown_field_is_refused(tmp_path):
    js = tmp_path / "d.json"
    js.write_text(json.dumps([{"id": "r1", "driver": "sim", "password": "x"}]))
    with pytest.raises(ConfigError, match="unknown field"):
        read_device_file(js, "default")


def test_credentials_are_read_by_name_from_the_credentials_directory(tmp_path, monkeypatch):
    (tmp_path / "router-admin").write_text('{"username": "u", "password": "p"}\n')
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    store = CredentialStore(tmp_path)
    assert store.get_json("router-admin") == {"username": "u", "password": "p"}
    with pytest.raises(ConfigError, match="not found"):
        store.get("missing")
    with pytest.raises(ConfigError, match="plain file name"):
        store.get("../etc/passwd")


def test_an_unreadable_credentials_directory_is_a_configuration_error_not_a_passing_one(tmp_path, monkeypatch):
    def denied(path):  # what a 0700 directory of another user gives (root, who runs the tests, is never denied)
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(type(tmp_path), "is_file", denied)
    with pytest.raises(ConfigError, match=r"credential 'router-admin': cannot read .*permission denied.*agent's user"):
        CredentialStore(tmp_path).get("router-admin")


def test_doctor_checks_each_devices_credential_without_showing_it(tmp_path):
    from agent.drivers.base import CredentialStore
    from agent.model.device import Device
    from agent.ops.doctor import credential_checks

    (tmp_path / "r1-admin").write_text("s3cret-value\n")
    unreadable = tmp_path / "r3-admin"
    unreadable.mkdir()  # a directory where the file should be: exists, cannot be read as one
    devices = [Device("r1", "http", credential="r1-admin"), Device("r2", "http", credential="r2-admin"),
               Device("r3", "http", credential="r3-admin"), Device("r4", "sim")]
    checks = credential_checks(devices, CredentialStore(tmp_path))
    assert [(c.name, c.ok) for c in checks] == [("credential r1-admin (r1)", True), ("credential r2-admin (r2)", False),
                                                ("credential r3-admin (r3)", False)]
    assert "AGENT_CREDENTIALS_DIR" in (checks[1].remedy or "")
    assert all("s3cret" not in f"{c.detail} {c.remedy}" for c in checks)


def test_max_parallel_is_the_agents_option_not_the_drivers():
    from agent.errors import ConfigError
    from agent.model.device import Device
    from agent.ops.admin import validate_device

    validate_device(Device("r1", "sim", options={"max_parallel": 4}))  # sim refuses unknown options
    with pytest.raises(ConfigError, match="max_parallel must be an integer from 1 to 64"):
        validate_device(Device("r1", "sim", options={"max_parallel": 0}))
