"""The ssh driver against a real OpenSSH sshd on loopback (Debian openssh-server).

Every change is checked on the machine itself (a file per service, or a fake init system's state
files), never only through the driver. Logins are counted in sshd's own log.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.drivers import ssh_proto
from agent.drivers.base import CredentialStore, DriverContext
from agent.drivers.ssh import SshDriver
from agent.errors import ConfigError, NoAnswerError, PermanentError, TransientError, UnreachableError
from agent.model.device import Device
from tests.drivers.target_ssh import file_commands
from tests.support.sshd import Sshd, keypair, public_line, sshd_available
from tests.support.wait import until

pytestmark = pytest.mark.skipif(sshd_available() is not None, reason=str(sshd_available()))

FAKE_SYSTEMCTL = """#!/bin/sh
# systemctl as far as the systemd preset uses it: units are files in $UNITS, active ones in $ACTIVE,
# enabled ones (started at boot) in $ENABLED
UNITS=@UNITS@; ACTIVE=@ACTIVE@; ENABLED=@ENABLED@
cmd=$1; shift
now=; [ "$1" = --now ] && now=1 && shift
[ "$1" = --property=LoadState ] && shift && shift  # show --property=LoadState --value
[ "$1" = -- ] && shift
unit=$1
case $cmd in
  show) [ -e "$UNITS/$unit" ] && echo loaded || echo not-found ;;
  is-active) [ -e "$ACTIVE/$unit" ] && { echo active; exit 0; }; echo inactive; exit 3 ;;
  enable) [ -e "$UNITS/$unit" ] || { echo "Failed to enable unit: Unit file $unit.service does not exist." >&2
                                     exit 1; }
          touch "$ENABLED/$unit"; [ -n "$now" ] && touch "$ACTIVE/$unit"; exit 0 ;;
  disable) [ -e "$UNITS/$unit" ] || { echo "Failed to disable unit: Unit file $unit.service does not exist." >&2
                                      exit 1; }
           rm -f "$ENABLED/$unit"; [ -n "$now" ] && rm -f "$ACTIVE/$unit"; exit 0 ;;
  *) echo "fake systemctl: $cmd not supported" >&2; exit 1 ;;
esac
"""

FAKE_INIT_SCRIPT = """#!/bin/sh
# an OpenWrt procd init script as far as the openwrt preset uses it; state files in $S. A service with
# INSTANCE=1 runs a procd instance when started; the firewall (INSTANCE=0) only loads rules.
S=@STATE@; INSTANCE=@INSTANCE@; name=$(basename "$0")
case $1 in
  enable) touch $S/$name.enabled ;;
  disable) rm -f $S/$name.enabled ;;
  enabled) [ -e $S/$name.enabled ] ;;
  start) [ $INSTANCE = 1 ] && touch $S/$name.running || touch $S/$name.loaded ;;
  stop) rm -f $S/$name.running $S/$name.loaded ;;
  running) exit 0 ;;  # what 19.07 and older answer for every service, whatever it does
  *) exit 1 ;;
esac
"""

# ubus as far as `ubus call service list '{"name":"<svc>"}'` goes: procd's instances of the service
FAKE_UBUS = """#!/usr/bin/env python3
import json, os, sys
name = json.loads(sys.argv[4])["name"]
running = os.path.exists(os.path.join("@STATE@", name + ".running"))
instances = {"instance1": {"running": True, "pid": 1234}} if running else {}
print(json.dumps({name: {"instances": instances} if instances else {}}))
"""

# OpenWrt's jsonfilter, for the one expression the preset uses: @[*].instances[*].running
FAKE_JSONFILTER = """#!/usr/bin/env python3
import json, sys
assert sys.argv[1:] == ["-e", "@[*].instances[*].running"], sys.argv
for service in json.load(sys.stdin).values():
    for instance in service.get("instances", {}).values():
        if "running" in instance:
            print(json.dumps(instance["running"]))
"""


@dataclass
class Box:
    sshd: Sshd
    driver: SshDriver
    creds: Path
    state: Path
    bin: Path

    def device(self, credential: str = "key", **options: Any) -> Device:
        base = {"username": "root", "host_key": self.sshd.host_key_line, "timeout": 5.0,
                **file_commands(self.state)}
        return Device("box", "ssh", self.sshd.address, options={**base, **options}, credential=credential)

    def on(self, service: str) -> bool:
        return (self.state / service / "on").exists()


@pytest.fixture
async def box(tmp_path: Path) -> AsyncIterator[Box]:
    creds = tmp_path / "creds"
    creds.mkdir()
    key = keypair(creds / "key")
    keypair(creds / "other-key")
    (creds / "password").write_text("pw-Not-Accepted-31b7\n")
    (tmp_path / "bin").mkdir()
    (tmp_path / "state" / "alice").mkdir(parents=True)
    sshd = await asyncio.to_thread(Sshd(tmp_path / "sshd", [public_line(key)], str(tmp_path / "bin")).start)
    driver = SshDriver(DriverContext(device_timeout=5.0, credentials=CredentialStore(creds)))
    try:
        yield Box(sshd, driver, creds, tmp_path / "state", tmp_path / "bin")
    finally:
        await driver.close()
        await asyncio.to_thread(sshd.stop)


# -- switching and reading ---------------------------------------------------------------

async def test_on_and_off_change_the_file_on_the_host(box: Box) -> None:
    dev = box.device()
    await box.driver.apply(dev, "alice", "on")
    assert box.on("alice")
    assert await box.driver.read(dev, "alice") == "on"
    await box.driver.apply(dev, "alice", "off")
    assert not box.on("alice")
    assert await box.driver.read(dev, "alice") == "off"


async def test_service_key_reaches_the_shell_as_one_quoted_word(box: Box) -> None:
    service = "x; touch pwned $(touch pwned2)"
    (box.state / service).mkdir()
    dev = box.device(service_pattern=r"[a-z0-9 ;$()]+")
    await box.driver.apply(dev, service, "on")
    assert (box.state / service / "on").exists()
    assert await box.driver.read(dev, service) == "on"
    assert not list(Path("/root").glob("pwned*")) and not list(box.state.glob("pwned*"))


async def test_invalid_key_is_refused_before_connecting(box: Box) -> None:
    for call in (lambda: box.driver.read(box.device(), "../alice"),
                 lambda: box.driver.apply(box.device(), "a;reboot", "off")):
        with pytest.raises(PermanentError, match="service_pattern"):
            await call()
    assert box.sshd.accepted() == 0


async def test_missing_service_is_permanent_quoting_the_device(box: Box) -> None:
    for call in (lambda: box.driver.read(box.device(), "nobody"),
                 lambda: box.driver.apply(box.device(), "nobody", "on")):
        with pytest.raises(PermanentError, match=r"exit 4.*: no such service: nobody$"):
            await call()


async def test_state_from_output_patterns(box: Box) -> None:
    (box.state / "alice" / "state").write_text("stopped\n")
    dev = box.device(status_command=f"cat {box.state}/{{service}}/state", on_pattern="^running$",
                     off_pattern="^stopped$")
    assert await box.driver.read(dev, "alice") == "off"
    (box.state / "alice" / "state").write_text("running\n")
    assert await box.driver.read(dev, "alice") == "on"
    (box.state / "alice" / "state").write_text("starting\x1b[31m\n")
    with pytest.raises(PermanentError, match=r"neither on_pattern nor off_pattern \(exit 0\): starting\\x1b\[31m"):
        await box.driver.read(dev, "alice")


async def test_unexpected_status_is_permanent_with_escaped_output(box: Box) -> None:
    dev = box.device(status_command="printf 'disk\\033[2J failure\\n' >&2; exit 7")
    with pytest.raises(PermanentError) as caught:
        await box.driver.read(dev, "alice")
    assert "status exit 7" in str(caught.value) and "disk\\x1b[2J failure" in str(caught.value)
    assert "\x1b" not in str(caught.value)


async def test_output_is_bounded(box: Box) -> None:
    dev = box.device(status_command="head -c 5000000 /dev/zero", max_output_bytes=1024)
    with pytest.raises(PermanentError, match="more than 1024 bytes"):
        await box.driver.read(dev, "alice")


async def test_failed_command_is_permanent_and_255_transient(box: Box) -> None:
    with pytest.raises(PermanentError, match="exit 2: cannot do that"):
        await box.driver.apply(box.device(on_command="echo 'cannot do that' >&2; exit 2"), "alice", "on")
    with pytest.raises(TransientError, match="exit 255"):
        await box.driver.apply(box.device(on_command="exit 255"), "alice", "on")


# -- host keys and credentials -----------------------------------------------------------

async def test_wrong_host_key_is_refused_before_anything_runs(box: Box, tmp_path: Path) -> None:
    stranger = public_line(keypair(tmp_path / "stranger"))
    known = tmp_path / "known_hosts"
    known.write_text(f"[127.0.0.1]:{box.sshd.port} {stranger}\n")
    by_file = box.device(known_hosts=str(known))
    by_file.options.pop("host_key")
    for dev in (box.device(host_key=stranger), by_file):
        with pytest.raises(ConfigError, match="host key does not match"):
            await box.driver.apply(dev, "alice", "on")
    assert not box.on("alice") and box.sshd.accepted() == 0


async def test_known_hosts_file_with_the_right_key_works(box: Box, tmp_path: Path) -> None:
    dev = box.device(known_hosts=str(box.sshd.write_known_hosts(tmp_path / "known_hosts")))
    dev.options.pop("host_key")
    await box.driver.apply(dev, "alice", "on")
    assert box.on("alice")


async def test_no_host_key_option_is_config_error(box: Box) -> None:
    dev = box.device()
    dev.options.pop("host_key")
    with pytest.raises(ConfigError, match="host key is always verified"):
        box.driver.validate_options(dev)
    with pytest.raises(ConfigError):
        await box.driver.read(dev, "alice")
    assert box.sshd.accepted() == 0


@pytest.mark.parametrize("credential", ["other-key", "password"])
async def test_refused_credential_is_config_error_naming_it(box: Box, credential: str) -> None:
    with pytest.raises(ConfigError) as caught:
        await box.driver.read(box.device(credential), "alice")
    text = str(caught.value)
    assert f"credential {credential!r}" in text
    secret = (box.creds / credential).read_text().strip()
    lines = secret.splitlines()
    assert secret not in text and lines[len(lines) // 2] not in text
    assert "ssh-keys" not in text  # the RouterOS public-key hint is for a RouterOS console only


async def test_a_refused_routeros_console_password_names_an_imported_public_key_as_a_cause(box: Box) -> None:
    # RouterOS takes only the key of a user who has one imported, and refuses the right password
    with pytest.raises(ConfigError, match=r"credential 'password'.*imported \(`/user ssh-keys print`\)"):
        await box.driver.read(box.device("password", quote="routeros"), "alice")
    with pytest.raises(ConfigError) as caught:
        await box.driver.read(box.device("other-key", quote="routeros"), "alice")
    assert "ssh-keys" not in str(caught.value)  # a refused key: the hint would mislead


# -- timeouts and connections ------------------------------------------------------------

async def test_hanging_command_is_no_answer_within_the_timeout(box: Box, tmp_path: Path) -> None:
    pidfile = tmp_path / "hung.pid"
    dev = box.device(status_command=f"echo $$ > {pidfile}; exec sleep 30", timeout=1.0)
    start = time.monotonic()
    try:
        with pytest.raises(NoAnswerError) as caught:
            await box.driver.read(dev, "alice")
        assert not isinstance(caught.value, UnreachableError)
        assert 0.9 <= time.monotonic() - start < 2.5
    finally:  # sshd refuses the driver's KILL signal request for root logins: end the sleep here
        with contextlib.suppress(ValueError, OSError):
            os.kill(int(pidfile.read_text()), signal.SIGKILL)


async def test_one_connection_serves_many_operations(box: Box) -> None:
    dev = box.device()
    for state in ("on", "off", "on"):
        await box.driver.apply(dev, "alice", state)
        assert await box.driver.read(dev, "alice") == state
    await box.driver.probe(dev)
    assert box.sshd.accepted() == 1 and box.sshd.connections() == 1


async def test_concurrent_first_uses_open_one_connection(box: Box) -> None:
    dev = box.device()
    assert await asyncio.gather(*(box.driver.read(dev, "alice") for _ in range(8))) == ["off"] * 8
    assert box.sshd.accepted() == 1


async def test_connection_killed_on_the_server_is_opened_again(box: Box) -> None:
    dev = box.device()
    await box.driver.read(dev, "alice")
    assert box.sshd.drop_connections() == 1
    await box.driver.apply(dev, "alice", "on")
    assert box.on("alice") and box.sshd.accepted() == 2


async def test_concurrent_uses_after_a_kill_share_one_new_connection(box: Box) -> None:
    dev = box.device()
    await box.driver.read(dev, "alice")
    box.sshd.drop_connections()
    assert await asyncio.gather(*(box.driver.read(dev, "alice") for _ in range(6))) == ["off"] * 6
    assert box.sshd.accepted() == 2
    await until(lambda: box.sshd.connections() == 1, 5, what="only the new connection left on the server")


async def test_server_restart_unreachable_then_reconnected(box: Box) -> None:
    dev = box.device()
    await box.driver.read(dev, "alice")
    await asyncio.to_thread(box.sshd.stop)
    with pytest.raises(UnreachableError):
        await box.driver.read(dev, "alice")
    await asyncio.to_thread(box.sshd.start, True)
    await box.driver.apply(dev, "alice", "on")
    assert box.on("alice") and box.sshd.accepted() == 2


async def test_close_ends_the_connection(box: Box) -> None:
    await box.driver.read(box.device(), "alice")
    assert box.sshd.connections() == 1
    await box.driver.close()
    await until(lambda: box.sshd.connections() == 0, 5, what="sshd to see the connection closed")


# -- presets -----------------------------------------------------------------------------

async def test_systemd_preset_with_a_fake_systemctl(box: Box, tmp_path: Path) -> None:
    units, active, enabled = tmp_path / "units", tmp_path / "active", tmp_path / "enabled"
    for d in (units, active, enabled):
        d.mkdir()
    (units / "wifi").touch()
    script = box.bin / "systemctl"
    script.write_text(FAKE_SYSTEMCTL.replace("@UNITS@", str(units)).replace("@ACTIVE@", str(active))
                      .replace("@ENABLED@", str(enabled)))
    script.chmod(0o755)
    dev = Device("host", "ssh", box.sshd.address, credential="key",
                 options={"preset": "systemd", "username": "root", "host_key": box.sshd.host_key_line})
    await box.driver.probe(dev)
    assert await box.driver.read(dev, "wifi") == "off"
    await box.driver.apply(dev, "wifi", "on")
    assert (active / "wifi").exists() and (enabled / "wifi").exists() and await box.driver.read(dev, "wifi") == "on"
    await box.driver.apply(dev, "wifi", "off")
    assert not (active / "wifi").exists() and await box.driver.read(dev, "wifi") == "off"
    assert not (enabled / "wifi").exists(), "a suspended unit must not start again at the next boot"
    with pytest.raises(PermanentError, match="not loaded: LoadState=not-found"):
        await box.driver.read(dev, "ghost")
    with pytest.raises(PermanentError, match="exit 1: Failed to enable unit"):
        await box.driver.apply(dev, "ghost", "on")


async def test_openwrt_preset_commands_in_a_real_shell(box: Box, tmp_path: Path) -> None:
    """The preset's shell logic, run by sh on the host with /etc/init.d swapped for a test directory
    and ubus/jsonfilter standing in for procd's view of the services."""
    init, state = tmp_path / "init.d", tmp_path / "svc-state"
    init.mkdir()
    state.mkdir()
    for name, instance in (("wifi", "1"), ("firewall", "0")):
        (init / name).write_text(FAKE_INIT_SCRIPT.replace("@STATE@", str(state)).replace("@INSTANCE@", instance))
        (init / name).chmod(0o755)
    for name, text in (("ubus", FAKE_UBUS.replace("@STATE@", str(state))), ("jsonfilter", FAKE_JSONFILTER)):
        (box.bin / name).write_text(text)
        (box.bin / name).chmod(0o755)
    commands = {k: v.replace("/etc/init.d", str(init)) for k, v in ssh_proto.PRESETS["openwrt"].items()
                if k.endswith("_command")}
    dev = Device("cpe", "ssh", box.sshd.address, credential="key",
                 options={"username": "root", "host_key": box.sshd.host_key_line, **commands,
                          "no_instance_services": ["firewall"]})
    assert await box.driver.read(dev, "wifi") == "off"  # `running` would say 0 here: it is not asked
    await box.driver.apply(dev, "wifi", "on")
    assert {p.name for p in state.iterdir()} == {"wifi.enabled", "wifi.running"}
    assert await box.driver.read(dev, "wifi") == "on"
    (state / "wifi.running").unlink()  # crashed: enabled but not running is not on
    assert await box.driver.read(dev, "wifi") == "off"
    await box.driver.apply(dev, "wifi", "off")
    assert not list(state.iterdir()) and await box.driver.read(dev, "wifi") == "off"
    # the firewall has no procd instance: marked in no_instance_services, on = enabled
    await box.driver.apply(dev, "firewall", "on")
    assert await box.driver.read(dev, "firewall") == "on"
    await box.driver.apply(dev, "firewall", "off")
    assert await box.driver.read(dev, "firewall") == "off"
    with pytest.raises(PermanentError, match="no init script"):
        await box.driver.apply(dev, "ghost", "on")
