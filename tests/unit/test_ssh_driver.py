"""The ssh driver's pure parts: options and presets, service keys, quoting, and what a command's exit
status and output mean. No sockets (tests/drivers/test_ssh.py runs against a real sshd)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest

from agent.drivers import ssh_proto as p
from agent.drivers.base import CredentialStore, DriverContext
from agent.drivers.ssh import SshDriver
from agent.errors import ConfigError, PermanentError, TransientError
from agent.model.device import Device

HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAILHWHw7XJri0IJa1gcxDxRJcI/ArgTfKIk4gXaNBsmSi cpe-7"
FILES = {"on_command": "touch /s/{service}", "off_command": "rm -f /s/{service}",
         "status_command": "test -e /s/{service}", "status_off_exit": 1}


def opts(address: str = "10.0.0.1", **options: Any) -> p.Options:
    return p.parse_options({"username": "root", "host_key": HOST_KEY, **FILES, **options}, address, 7.0)


def result(status: int | None, out: bytes = b"", err: bytes = b"", truncated: bool = False) -> p.Result:
    return p.Result(status, out, err, truncated)


# -- options -----------------------------------------------------------------------------

def test_defaults() -> None:
    o = opts()
    assert (o.host, o.port, o.timeout, o.quote, o.max_output_bytes) == ("10.0.0.1", 22, 7.0, "posix", 65536)
    assert (o.status_on_exit, o.status_off_exit, o.on_pattern, o.fail_pattern) == (0, 1, None, None)
    assert o.service_pattern.pattern == p.DEFAULT_SERVICE_PATTERN and o.host_keys == (HOST_KEY,)


@pytest.mark.parametrize(("address", "host", "port"), [
    ("cpe-7.example.net", "cpe-7.example.net", 22), ("10.1.2.3:2222", "10.1.2.3", 2222),
    ("[fd00::7]:22", "fd00::7", 22),
])
def test_address(address: str, host: str, port: int) -> None:
    assert p.parse_address(address) == (host, port)


@pytest.mark.parametrize("address", [None, "", "host:notaport", "user@host", "host/path", "host:99999"])
def test_bad_address(address: str | None) -> None:
    with pytest.raises(ConfigError, match="address"):
        p.parse_address(address)


@pytest.mark.parametrize(("change", "message"), [
    ({"host_key": None}, "host key is always verified"),
    ({"known_hosts": "/etc/ssh/ssh_known_hosts"}, "not both"),
    ({"host_key": 5}, "host_key must be"),
    ({"username": ""}, "username is required"),
    ({"on_command": None}, "on_command is required"),
    ({"status_command": "  "}, "status_command is required"),
    ({"preset": "cisco"}, "unknown preset"),
    ({"timeout": 0}, "timeout"),
    ({"timeout": "soon"}, "timeout"),
    ({"on_pattern": "^up$"}, "both on_pattern and off_pattern"),
    ({"on_pattern": "(", "off_pattern": "x"}, "on_pattern is not a valid regular expression"),
    ({"service_pattern": "[a-"}, "service_pattern"),
    ({"status_off_exit": 0}, "must differ"),
    ({"status_on_exit": True}, "status_on_exit must be an integer"),
    ({"max_output_bytes": 0}, "max_output_bytes"),
    ({"quote": "cmd.exe"}, "quote must be"),
])
def test_options_that_cannot_work(change: dict[str, Any], message: str) -> None:
    options = {"username": "root", "host_key": HOST_KEY, **FILES, **change}
    options = {k: v for k, v in options.items() if v is not None}
    with pytest.raises(ConfigError, match=message):
        p.parse_options(options, "10.0.0.1", 5.0)


def test_preset_fills_commands_and_options_override_it() -> None:
    o = p.parse_options({"preset": "systemd", "username": "ops", "known_hosts": "/k", "off_command": "true"},
                        "h", 5.0)
    assert o.on_command == "systemctl enable --now -- {service}" and o.off_command == "true"
    assert (o.status_on_exit, o.status_off_exit, o.known_hosts, o.host_keys) == (0, 3, "/k", ())


# -- service keys and quoting ------------------------------------------------------------

@pytest.mark.parametrize("service", ["wifi", "dnsmasq.service", "getty@tty1", "pppoe-alice_2", "7"])
def test_default_pattern_accepts(service: str) -> None:
    p.check_service(opts(), service)


@pytest.mark.parametrize("service", ["", "-rf", ".hidden", "../etc", "a b", "a;reboot", "$(id)", "a\n", "ä",
                                     "x/y", "a'b"])
def test_default_pattern_refuses(service: str) -> None:
    with pytest.raises(PermanentError, match="does not match service_pattern"):
        p.check_service(opts(), service)


def test_control_characters_refused_whatever_the_pattern() -> None:
    loose = opts(service_pattern=".*")
    for service in ("a\nreboot", "a\x00", "a\x1b[2J", "a\rb"):
        with pytest.raises(PermanentError):
            p.check_service(loose, service)
    p.check_service(loose, "any thing; at all")


@pytest.mark.parametrize("service", ["plain", "a b", "x; touch /tmp/pwned", "$(id)", "`id`", "it's", '"q"', "*"])
def test_posix_quoting_yields_one_literal_word(service: str) -> None:
    command = p.render("systemctl start -- {service} && echo done", service)
    assert shlex.split(command)[3] == service
    assert shlex.split(command)[4:] == ["&&", "echo", "done"]


def test_template_braces_other_than_service_are_kept() -> None:
    assert p.render('x || { echo "{other}"; }; {service}', "a") == 'x || { echo "{other}"; }; a'


@pytest.mark.parametrize(("value", "literal"), [
    ("alice", '"alice"'), ('a"b', '"a\\"b"'), ("a$b", '"a\\$b"'), ("a?b", '"a\\?b"'), ("a\\b", '"a\\\\b"'),
])
def test_routeros_quoting(value: str, literal: str) -> None:
    assert p.quote_routeros(value) == literal


def test_command_for_checks_the_key_first() -> None:
    assert p.command_for(opts(), "alice", "on") == "touch /s/alice"
    assert p.command_for(opts(), "alice", None) == "test -e /s/alice"
    with pytest.raises(PermanentError):
        p.command_for(opts(), "../x", "off")


# -- presets -----------------------------------------------------------------------------

def preset(name: str, **options: Any) -> p.Options:
    return p.parse_options({"preset": name, "username": "admin", "host_key": HOST_KEY, **options}, "h", 5.0)


def test_systemd_preset_commands() -> None:
    o = preset("systemd")
    # off also disables, so a suspended service does not come back at the next boot; on enables again
    assert p.command_for(o, "wifi", "on") == "systemctl enable --now -- wifi"
    assert p.command_for(o, "wifi", "off") == "systemctl disable --now -- wifi"
    status = p.command_for(o, "wifi", None)
    assert "systemctl show --property=LoadState --value -- wifi" in status
    assert status.endswith("systemctl is-active -- wifi") and "exit 4" in status
    assert (o.status_on_exit, o.status_off_exit, o.probe_command) == (0, 3, "true")


def test_openwrt_preset_commands() -> None:
    o = preset("openwrt")
    guard = '[ -x /etc/init.d/wifi ] || { echo "no init script /etc/init.d/"wifi >&2; exit 4; }; '
    assert p.command_for(o, "wifi", "on") == guard + "/etc/init.d/wifi enable && /etc/init.d/wifi start"
    assert p.command_for(o, "wifi", "off") == guard + "/etc/init.d/wifi disable; /etc/init.d/wifi stop"
    status = p.command_for(o, "wifi", None)
    assert status.startswith(guard + "/etc/init.d/wifi enabled || exit 3; n=wifi; ubus call service list ")
    assert "running" not in status.replace(".running'", "")  # never `/etc/init.d/wifi running`
    marked = preset("openwrt", no_instance_services=["firewall"])
    assert p.command_for(marked, "firewall", None) == guard.replace("wifi", "firewall") + (
        "/etc/init.d/firewall enabled && exit 0; exit 3")
    assert p.command_for(marked, "wifi", None) == status


def test_routeros_cli_preset_commands() -> None:
    o = preset("routeros-cli")
    missing = ':if ([:len [/ppp secret find name="alice"]] = 0) do={:error ("no such item: ppp secret " . "alice")}; '
    assert p.command_for(o, "alice", "on") == missing + '/ppp secret set [find name="alice"] disabled=no'
    assert p.command_for(o, "alice", "off") == missing + ('/ppp secret set [find name="alice"] disabled=yes; '
                                                          '/ppp active remove [find name="alice"]')
    assert p.command_for(o, "alice", None) == (':put ("disabled=" . [/ppp secret get [find name="alice"] disabled]'
                                               ' . " sessions=" . [:len [/ppp active find name="alice"]])')
    assert p.state_of(o, result(0, b"disabled=false sessions=1\r\n"), "r") == "on"
    assert p.state_of(o, result(0, b"disabled=true sessions=0\r\n"), "r") == "off"
    with pytest.raises(PermanentError, match="neither"):  # disabled, but the session is still up
        p.state_of(o, result(0, b"disabled=true sessions=1\r\n"), "r")
    with pytest.raises(PermanentError, match="no such item"):
        p.check_applied(o, result(0, b"no such item: ppp secret alice\r\n"), "r")


def test_routeros_cli_without_an_exit_status_reads_its_output_line_by_line() -> None:
    o = preset("routeros-cli")  # RouterOS may close the channel without an exit status, and print a blank line first
    assert p.state_of(o, result(None, b"\r\ndisabled=false sessions=1\r\n"), "r") == "on"
    assert p.state_of(o, result(None, b"disabled=true sessions=0\r\n"), "r") == "off"
    with pytest.raises(TransientError, match="without an exit status"):
        p.state_of(o, result(None, b""), "r")  # nothing came back: the connection was lost
    with pytest.raises(TransientError, match="no exit status and the output matches neither"):
        p.state_of(o, result(None, b"disabled=tr"), "r")  # cut short
    p.check_applied(o, result(None, b""), "r")  # silent success; the executor's read-back verifies it
    with pytest.raises(PermanentError, match="no such item"):
        p.check_applied(o, result(None, b"no such item: ppp secret alice\r\n"), "r")


def test_on_and_off_patterns_match_per_line() -> None:
    o = opts(on_pattern=r"^active$", off_pattern=r"^inactive$")
    assert p.state_of(o, result(0, b"Welcome to the box\nactive\n"), "r") == "on"


def test_a_refused_routeros_password_mentions_an_imported_public_key() -> None:
    assert "ssh-keys" in p.refused_hint(preset("routeros-cli"), password=True)
    assert p.refused_hint(preset("routeros-cli"), password=False) == ""
    assert p.refused_hint(preset("systemd"), password=True) == ""


def test_routeros_cli_escapes_a_wider_key() -> None:
    o = preset("routeros-cli", service_pattern=r"[\w.@$\"-]+")
    assert '[find name="a\\$b\\"c@isp"]' in p.command_for(o, 'a$b"c@isp', "on")


# -- what replies mean -------------------------------------------------------------------

def test_exit_statuses_map_to_states() -> None:
    o = opts(status_on_exit=0, status_off_exit=3)
    assert p.state_of(o, result(0), "r") == "on"
    assert p.state_of(o, result(3), "r") == "off"
    with pytest.raises(PermanentError, match=r"status exit 4, neither status_on_exit \(0\) nor status_off_exit "
                                             r"\(3\): Unit x not loaded"):
        p.state_of(o, result(4, b"inactive\n", b"Unit x not loaded\n"), "r")


def test_patterns_decide_when_set() -> None:
    o = opts(on_pattern=r"(?m)^active$", off_pattern=r"(?m)^(inactive|failed)$")
    assert p.state_of(o, result(3, b"active\n"), "r") == "on"
    assert p.state_of(o, result(0, b"failed\n"), "r") == "off"
    with pytest.raises(PermanentError, match="neither on_pattern nor off_pattern"):
        p.state_of(o, result(0, b"activating\n"), "r")
    with pytest.raises(PermanentError, match="both on_pattern and off_pattern"):
        p.state_of(o, result(0, b"active\ninactive\n"), "r")


def test_device_output_in_errors_is_escaped_and_bounded() -> None:
    with pytest.raises(PermanentError) as caught:
        p.state_of(opts(), result(9, b"\x1b[2Jevil\nline " + b"x" * 5000), "r")
    text = str(caught.value)
    assert "\\x1b[2Jevil\\nline" in text and "\x1b" not in text and "\n" not in text and len(text) < 400


def test_truncated_status_output_is_refused() -> None:
    with pytest.raises(PermanentError, match="max_output_bytes"):
        p.state_of(opts(), result(0, b"x" * 10, truncated=True), "r")


@pytest.mark.parametrize("status", [None, -1])
def test_no_exit_status_is_transient(status: int | None) -> None:
    with pytest.raises(TransientError):
        p.state_of(opts(), result(status), "r")
    with pytest.raises(TransientError, match="without an exit status"):
        p.check_applied(opts(), result(status), "r")


def test_applied_command_outcomes() -> None:
    p.check_applied(opts(), result(0, b"lots of chatter"), "r")
    with pytest.raises(TransientError, match="exit 255"):
        p.check_applied(opts(), result(255, b"", b"ssh: connect to host x: No route"), "r")
    with pytest.raises(PermanentError, match=r"exit 1: Failed to start x\\x07"):
        p.check_applied(opts(), result(1, b"", b"Failed to start x\x07\n"), "r")
    with pytest.raises(PermanentError, match="exit 5: said this"):
        p.check_applied(opts(), result(5, b"said this\n"), "r")
    failing = opts(fail_pattern=r"(?m)^failure:")
    with pytest.raises(PermanentError, match="reported a failure: failure: item not found"):
        p.check_applied(failing, result(0, b"failure: item not found\n"), "r")


def test_private_key_or_password_by_content() -> None:
    assert p.is_private_key("-----BEGIN OPENSSH PRIVATE KEY-----\nb3Bl\n-----END OPENSSH PRIVATE KEY-----")
    assert p.is_private_key("\n-----BEGIN RSA PRIVATE KEY-----\nMIIE\n-----END RSA PRIVATE KEY-----")
    assert not p.is_private_key("-----BEGIN PUBLIC KEY----- is my password")
    assert not p.is_private_key("correct horse battery staple")


# -- driver checks that need no server ---------------------------------------------------

def driver(tmp_path: Path) -> SshDriver:
    return SshDriver(DriverContext(credentials=CredentialStore(tmp_path)))


def test_validate_options_wants_a_credential_and_a_usable_host_key(tmp_path: Path) -> None:
    base = {"username": "root", **FILES}
    d = driver(tmp_path)
    with pytest.raises(ConfigError, match="credential"):
        d.validate_options(Device("h", "ssh", "h", options={**base, "host_key": HOST_KEY}))
    d.validate_options(Device("h", "ssh", "h", options={**base, "host_key": [HOST_KEY]}, credential="k"))
    with pytest.raises(ConfigError, match="host_key option cannot be used"):
        d.validate_options(Device("h", "ssh", "h", options={**base, "host_key": "ssh-ed25519 nonsense"},
                                  credential="k"))
    with pytest.raises(ConfigError, match=re.escape(f"known_hosts {tmp_path}/absent cannot be used")):
        d.validate_options(Device("h", "ssh", "h", options={**base, "known_hosts": str(tmp_path / "absent")},
                                  credential="k"))


async def test_unreadable_key_credential_is_config_error_without_its_text(tmp_path: Path) -> None:
    secret = "-----BEGIN OPENSSH PRIVATE KEY-----\nbm90LWEta2V5LXNlY3JldA==\n-----END OPENSSH PRIVATE KEY-----\n"
    (tmp_path / "k").write_text(secret)
    (tmp_path / "known").write_text(f"h {HOST_KEY}\n")
    dev = Device("h", "ssh", "127.0.0.1:1", credential="k",
                 options={"username": "root", "known_hosts": str(tmp_path / "known"), **FILES})
    with pytest.raises(ConfigError, match="credential 'k' is not a private key") as caught:
        await driver(tmp_path).read(dev, "alice")
    assert "bm90LWEta2V5LXNlY3JldA" not in str(caught.value)
