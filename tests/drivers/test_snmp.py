"""The `snmp` driver against real net-snmp snmpd managing veth ports in a namespace the test makes.

Every command is checked on the interface itself (its UP flag, read with `ip`), never only through
the driver. Devices speak v2c (write community), v3 authPriv SHA/AES and SHA-256/AES-256.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from agent.drivers.base import CredentialStore, DriverContext
from agent.drivers.snmp import SnmpDriver
from agent.errors import ConfigError, NoAnswerError, PermanentError, UnreachableError
from agent.model.device import Device, State
from tests.support.snmpd import Snmpd, V3User, snmpd_available
from tests.support.wait import until

pytestmark = pytest.mark.skipif(bool(snmpd_available()), reason=f"snmpd tests: {snmpd_available()}")

OPS = V3User("ops", "authKey-Ops-51ce", "privKey-Ops-0b7e")
OPS256 = V3User("ops256", "authKey-256-c3d9", "privKey-256-e18a", auth="SHA-256", priv="AES-256")
VIEWER = V3User("viewer", "authKey-View-2a6f", "privKey-View-d4b0", write=False)
PORTS = ["swp1", "swp2", "swp3", "swp4"]


@pytest.fixture(scope="module")
def snmpd() -> Iterator[Snmpd]:
    server = Snmpd(ports=PORTS, users=[OPS, OPS256, VIEWER])
    yield server
    server.close()


@pytest.fixture(scope="module")
def creds(snmpd: Snmpd, tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("snmp-credentials")
    (d / "sw-rw").write_text(snmpd.write_community + "\n")
    (d / "sw-ro").write_text(snmpd.read_community + "\n")
    for name, user in (("sw-ops", OPS), ("sw-ops256", OPS256), ("sw-viewer", VIEWER)):
        (d / name).write_text(json.dumps({"auth_key": user.auth_key, "priv_key": user.priv_key}))
    (d / "sw-wrong").write_text(json.dumps({"auth_key": "authKey-Not-This", "priv_key": OPS.priv_key}))
    return d


@pytest.fixture
async def driver(creds: Path) -> AsyncIterator[SnmpDriver]:
    d = SnmpDriver(DriverContext(device_timeout=5.0, credentials=CredentialStore(creds)))
    yield d
    await d.close()


def v2c(snmpd: Snmpd, credential: str = "sw-rw", **options: object) -> Device:
    return Device("sw-v2c", "snmp", snmpd.address, options={"version": "2c", "timeout": 3, **options},
                  credential=credential)


def v3(snmpd: Snmpd, user: str = "ops", credential: str = "sw-ops", **options: object) -> Device:
    return Device(f"sw-{user}", "snmp", snmpd.address,
                  options={"version": "3", "user": user, "timeout": 3, **options}, credential=credential)


def real(snmpd: Snmpd, port: str) -> State:
    return "on" if snmpd.is_up(port) else "off"


async def toggles(driver: SnmpDriver, snmpd: Snmpd, device: Device, service: str, port: str) -> None:
    """off, then on: each change seen on the interface itself, and read back alike."""
    for state in ("off", "on"):
        await driver.apply(device, service, state)  # type: ignore[arg-type]
        assert real(snmpd, port) == state, f"{service} {state}: the interface did not change"
        assert await driver.read(device, service) == state


async def test_v2c_write_community_turns_a_port_off_and_on(driver: SnmpDriver, snmpd: Snmpd) -> None:
    await toggles(driver, snmpd, v2c(snmpd), "if:swp1", "swp1")


async def test_v1_for_old_cpes_turns_a_port_off_and_on(driver: SnmpDriver, snmpd: Snmpd) -> None:
    await toggles(driver, snmpd, v2c(snmpd, version="1"), "if:swp1", "swp1")  # the walk uses GETNEXT


async def test_v3_authpriv_sha_aes_turns_a_port_off_and_on(driver: SnmpDriver, snmpd: Snmpd) -> None:
    await toggles(driver, snmpd, v3(snmpd), "if:swp2", "swp2")


async def test_v3_authpriv_sha256_aes256(driver: SnmpDriver, snmpd: Snmpd) -> None:
    dev = v3(snmpd, "ops256", "sw-ops256", auth_protocol="sha256", priv_protocol="aes256")
    await toggles(driver, snmpd, dev, "if:swp3", "swp3")


async def test_ifindex_key_addresses_the_same_interface(driver: SnmpDriver, snmpd: Snmpd) -> None:
    await toggles(driver, snmpd, v2c(snmpd), f"ifindex:{snmpd.ifindex('swp4')}", "swp4")


async def test_read_sees_a_change_made_on_the_device(driver: SnmpDriver, snmpd: Snmpd) -> None:
    """snmpd caches its interface table for a few seconds, as switches do: the change shows within that."""
    dev = v2c(snmpd)
    snmpd.set_up("swp4", False)
    try:
        await until(lambda: _reads(driver, dev, "if:swp4", "off"), timeout=15, what="swp4 read as off")
    finally:
        snmpd.set_up("swp4", True)
    await until(lambda: _reads(driver, dev, "if:swp4", "on"), timeout=15, what="swp4 read as on")


async def _reads(driver: SnmpDriver, dev: Device, service: str, state: State) -> bool:
    return await driver.read(dev, service) == state


async def test_read_only_community_is_config_error_naming_the_credential(driver: SnmpDriver,
                                                                         snmpd: Snmpd) -> None:
    dev = v2c(snmpd, "sw-ro")
    assert await driver.read(dev, "if:swp1") == "on"  # reading is allowed
    with pytest.raises(ConfigError) as err:
        await driver.apply(dev, "if:swp1", "off")
    assert "sw-ro" in str(err.value) and snmpd.read_community not in str(err.value)
    assert snmpd.is_up("swp1")


async def test_v1_read_only_community_is_config_error_not_a_missing_interface(driver: SnmpDriver,
                                                                              snmpd: Snmpd) -> None:
    """An SNMPv1 agent answers a SET it refuses with noSuchName (RFC 2576 maps noAccess and notWritable
    to it): the interface is there, the community may only read."""
    dev = v2c(snmpd, "sw-ro", version="1")
    assert await driver.read(dev, "if:swp1") == "on"
    with pytest.raises(ConfigError, match="SNMPv1 answers noSuchName to a SET it refuses") as err:
        await driver.apply(dev, "if:swp1", "off")
    assert "'sw-ro'" in str(err.value) and snmpd.read_community not in str(err.value)
    assert snmpd.is_up("swp1")


async def test_read_only_v3_user_is_config_error(driver: SnmpDriver, snmpd: Snmpd) -> None:
    with pytest.raises(ConfigError, match="sw-viewer"):
        await driver.apply(v3(snmpd, "viewer", "sw-viewer"), "if:swp1", "off")
    assert snmpd.is_up("swp1")


async def test_wrong_v3_key_or_unknown_user_is_config_error(driver: SnmpDriver, snmpd: Snmpd) -> None:
    with pytest.raises(ConfigError, match="WrongDigest"):
        await driver.read(v3(snmpd, "ops", "sw-wrong"), "if:swp1")
    with pytest.raises(ConfigError, match="UnknownUserName"):
        await driver.read(v3(snmpd, "nobody", "sw-ops"), "if:swp1")


async def test_unknown_interface_is_permanent_naming_it(driver: SnmpDriver, snmpd: Snmpd) -> None:
    dev = v2c(snmpd)
    for call in (driver.read(dev, "if:ge-0/0/99"), driver.apply(dev, "if:ge-0/0/99", "off")):
        with pytest.raises(PermanentError, match="ge-0/0/99"):
            await call
    for call in (driver.read(dev, "ifindex:4242"), driver.apply(dev, "ifindex:4242", "off")):
        with pytest.raises(PermanentError, match="ifindex:4242"):
            await call


async def test_renamed_interfaces_are_resolved_again(driver: SnmpDriver, snmpd: Snmpd, creds: Path) -> None:
    """A name that moved to another port drives that port, once the device reports it.

    (net-snmp keys its ifIndex by interface name, so it cannot show a stale ifIndex naming another
    port; the driver's check of the name at a cached ifIndex is covered in tests/unit.)"""
    dev = v2c(snmpd)
    assert await driver.read(dev, "if:swp1") == "on"  # caches swp1 -> its ifIndex
    snmpd.rename("swp1", "old1")
    snmpd.rename("swp2", "swp1")  # the name moves to another interface
    try:
        await until(lambda: _knows(creds, dev, "if:old1"), timeout=15, what="snmpd to report the new names")
        await driver.apply(dev, "if:swp1", "off")
        assert not snmpd.is_up("swp1") and snmpd.is_up("old1"), "the stale ifIndex was used"
        assert await driver.read(dev, "if:swp1") == "off"
        await driver.apply(dev, "if:swp1", "on")
    finally:
        snmpd.rename("swp1", "swp2")
        snmpd.rename("old1", "swp1")
    await until(lambda: _knows(creds, dev, "if:swp2"), timeout=15, what="snmpd to report the old names")
    assert await driver.read(dev, "if:swp1") == "on" and await driver.read(dev, "if:swp2") == "on"


async def _knows(creds: Path, dev: Device, service: str) -> bool:
    """Whether snmpd already reports a renamed interface (its table is cached): asked with no cache of ours."""
    fresh = SnmpDriver(DriverContext(credentials=CredentialStore(creds)))
    try:
        await fresh.read(dev, service)
        return True
    except PermanentError:
        return False
    finally:
        await fresh.close()


async def test_read_many_answers_every_service(driver: SnmpDriver, snmpd: Snmpd) -> None:
    dev = v2c(snmpd)
    await driver.apply(dev, "if:swp3", "off")
    assert not snmpd.is_up("swp3")
    try:
        got = await driver.read_many(dev, ["if:swp1", "if:swp3", f"ifindex:{snmpd.ifindex('swp2')}",
                                           "if:nope", "bad-key"])
    finally:
        await driver.apply(dev, "if:swp3", "on")
    assert {k: v for k, v in got.items() if isinstance(v, str)} == \
        {"if:swp1": "on", "if:swp3": "off", f"ifindex:{snmpd.ifindex('swp2')}": "on"}
    assert isinstance(got["if:nope"], PermanentError) and isinstance(got["bad-key"], PermanentError)


async def test_stopped_snmpd_is_no_answer_within_the_timeout(driver: SnmpDriver, snmpd: Snmpd) -> None:
    dev = v2c(snmpd, timeout=1.5)
    assert await driver.read(dev, "if:swp1") == "on"
    snmpd.stop()
    try:
        for call in (driver.read(dev, "if:swp1"), driver.apply(dev, "if:swp1", "off"), driver.probe(dev)):
            start = time.monotonic()
            with pytest.raises(NoAnswerError) as err:
                await call
            assert not isinstance(err.value, UnreachableError)
            assert time.monotonic() - start < 1.5 + 0.5
    finally:
        snmpd.start()
    assert await driver.read(dev, "if:swp1") == "on"
    assert snmpd.is_up("swp1")
