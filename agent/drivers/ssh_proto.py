"""The pure part of the `ssh` driver: options and presets, command templates, and what a command's
exit status and output mean. No sockets here; agent.drivers.ssh does the I/O.

A service key is checked against `service_pattern` (and never holds a control character) before a
template is filled; it goes into the command only quoted, for a POSIX shell (`shlex.quote`) or for
the RouterOS console (a double-quoted string with its escapes).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from agent.errors import ConfigError, PermanentError, TransientError
from agent.model.device import State
from agent.text import clean

DEFAULT_SERVICE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._@-]*$"
MAX_OUTPUT_BYTES = 64 * 1024
TRANSIENT_EXITS = frozenset({255})  # ssh's own "connection failed" status, from a command that hops on
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_SCRIPT_MISSING = '[ -x /etc/init.d/{service} ] || { echo "no init script /etc/init.d/"{service} >&2; exit 4; }; '
_ROS_MISSING = (':if ([:len [/ppp secret find name={service}]] = 0) do={:error ("no such item: ppp secret " . '
                '{service})}; ')

PRESETS: dict[str, dict[str, Any]] = {
    # `systemctl is-active` answers "inactive" (3) for a unit that does not exist: check LoadState first.
    # on = enabled and started, off = stopped and disabled: a suspended unit does not come back at reboot.
    "systemd": {
        "on_command": "systemctl enable --now -- {service}",
        "off_command": "systemctl disable --now -- {service}",
        "status_command": 'state=$(systemctl show --property=LoadState --value -- {service}); '
                          '[ "$state" = loaded ] || { echo "unit "{service}" is not loaded: LoadState=$state" >&2; '
                          'exit 4; }; systemctl is-active -- {service}',
        "probe_command": "true",
    },
    # on = enabled at boot and running now; off = disabled and stopped. Running is what procd says
    # (`ubus call service list`: an instance with "running": true), not `/etc/init.d/X running`, which
    # answers 0 for everything on 19.07 and older. A service without procd instances (the firewall only
    # loads rules) is listed in no_instance_services: for it, on = enabled.
    "openwrt": {
        "on_command": _SCRIPT_MISSING + "/etc/init.d/{service} enable && /etc/init.d/{service} start",
        "off_command": _SCRIPT_MISSING + "/etc/init.d/{service} disable; /etc/init.d/{service} stop",
        "status_command": _SCRIPT_MISSING + "/etc/init.d/{service} enabled || exit 3; n={service}; "
                                            "ubus call service list \"{\\\"name\\\":\\\"$n\\\"}\" "
                                            "| jsonfilter -e '@[*].instances[*].running' | grep -qx true "
                                            "&& exit 0; exit 3",
        "enabled_status_command": _SCRIPT_MISSING + "/etc/init.d/{service} enabled && exit 0; exit 3",
        "probe_command": "true",
    },
    # on = the PPP secret enabled; off = disabled and its live session removed (disabling alone keeps it).
    "routeros-cli": {
        "quote": "routeros",
        "on_command": _ROS_MISSING + "/ppp secret set [find name={service}] disabled=no",
        "off_command": _ROS_MISSING + "/ppp secret set [find name={service}] disabled=yes; "
                                      "/ppp active remove [find name={service}]",
        "status_command": ':put ("disabled=" . [/ppp secret get [find name={service}] disabled] . " sessions=" . '
                          '[:len [/ppp active find name={service}]])',
        "on_pattern": r"^disabled=false sessions=\d+\s*$",
        "off_pattern": r"^disabled=true sessions=0\s*$",
        "fail_pattern": r"(?im)^(failure:|no such item|syntax error|bad command name|expected |input does not match"
                        r"|invalid value)",
    },
}


@dataclass(frozen=True)
class Options:
    host: str
    port: int
    username: str
    on_command: str
    off_command: str
    status_command: str
    service_pattern: re.Pattern[str]
    timeout: float
    quote: str = "posix"
    status_on_exit: int = 0
    status_off_exit: int = 3
    on_pattern: re.Pattern[str] | None = None
    off_pattern: re.Pattern[str] | None = None
    fail_pattern: re.Pattern[str] | None = None
    probe_command: str | None = None
    max_output_bytes: int = MAX_OUTPUT_BYTES
    known_hosts: str | None = None
    host_keys: tuple[str, ...] = ()
    no_instance_services: frozenset[str] = frozenset()  # read with enabled_status_command instead
    enabled_status_command: str | None = None


@dataclass(frozen=True)
class Result:
    """What one command left: its exit status (None: none came, the channel or connection died, or a
    signal ended it), the first max_output_bytes of each stream, and whether stdout had more."""

    exit_status: int | None
    stdout: bytes = b""
    stderr: bytes = b""
    truncated: bool = False

    def said(self) -> str:
        """What the device said, escaped and short: stderr first, else stdout."""
        text = (self.stderr.strip() or self.stdout.strip()).decode(errors="replace")
        return clean(text, 200) if text else "nothing"


def parse_address(address: str | None) -> tuple[str, int]:
    if not address:
        raise ConfigError("ssh: the device needs an address (host[:port])")
    try:
        parts = urlsplit(f"ssh://{address}")
        host, port = parts.hostname, parts.port or 22
    except ValueError:
        host = None
    if not host or parts.path or parts.query or parts.username is not None:
        raise ConfigError(f"ssh: address {clean(address, 100)!r} is not host[:port]")
    return host, port


def _regex(options: dict[str, Any], name: str) -> re.Pattern[str] | None:
    """A pattern option; on_pattern, off_pattern and fail_pattern match per line (`^` and `$` at every
    line, as if written with (?m)): a device may print a banner or a blank line first."""
    value = options.get(name)
    if value is None:
        return None
    try:
        return re.compile(str(value), re.MULTILINE if name != "service_pattern" else 0)
    except re.error as exc:
        raise ConfigError(f"ssh: {name} is not a valid regular expression: {exc}") from None


def _int(options: dict[str, Any], name: str, default: int, low: int = 0) -> int:
    value = options.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"ssh: {name} must be an integer ≥ {low}")
    return value


def parse_options(options: dict[str, Any], address: str | None, default_timeout: float) -> Options:
    """The device's options over its preset's; ConfigError names the option that cannot work."""
    preset = options.get("preset")
    if preset is not None and preset not in PRESETS:
        raise ConfigError(f"ssh: unknown preset {clean(preset, 50)!r} (one of {', '.join(PRESETS)})")
    o = {**PRESETS.get(preset or "", {}), **options}
    commands: dict[str, str] = {}
    for name in ("on_command", "off_command", "status_command"):
        if not isinstance(o.get(name), str) or not o[name].strip():
            raise ConfigError(f"ssh: {name} is required (a command template with {{service}}), or set a preset")
        commands[name] = o[name]
    if not isinstance(o.get("username"), str) or not o["username"]:
        raise ConfigError("ssh: username is required")
    host, port = parse_address(address)
    known_hosts, host_keys = _host_keys(o)
    try:
        timeout = float(o.get("timeout", default_timeout))
        if not timeout > 0:
            raise ValueError
    except (TypeError, ValueError):
        raise ConfigError("ssh: timeout must be a positive number of seconds") from None
    if o.get("quote", "posix") not in ("posix", "routeros"):
        raise ConfigError("ssh: quote must be posix or routeros")
    on_pattern, off_pattern = _regex(o, "on_pattern"), _regex(o, "off_pattern")
    if (on_pattern is None) != (off_pattern is None):
        raise ConfigError("ssh: set both on_pattern and off_pattern, or neither (then exit statuses decide)")
    on_exit, off_exit = _int(o, "status_on_exit", 0), _int(o, "status_off_exit", 3)
    if on_exit == off_exit and on_pattern is None:
        raise ConfigError("ssh: status_on_exit and status_off_exit must differ")
    probe = o.get("probe_command")
    if probe is not None and not isinstance(probe, str):
        raise ConfigError("ssh: probe_command must be a command")
    marked = o.get("no_instance_services", [])
    if not isinstance(marked, list) or not all(isinstance(m, str) and m for m in marked):
        raise ConfigError("ssh: no_instance_services must be a list of service keys")
    enabled_status = o.get("enabled_status_command")
    if marked and (not isinstance(enabled_status, str) or not enabled_status.strip()):
        raise ConfigError("ssh: no_instance_services needs enabled_status_command (the openwrt preset has one)")
    return Options(host=host, port=port, username=o["username"], timeout=timeout, quote=o.get("quote", "posix"),
                   service_pattern=_regex(o, "service_pattern") or re.compile(DEFAULT_SERVICE_PATTERN),
                   status_on_exit=on_exit, status_off_exit=off_exit, on_pattern=on_pattern, off_pattern=off_pattern,
                   fail_pattern=_regex(o, "fail_pattern"), probe_command=probe or None,
                   max_output_bytes=_int(o, "max_output_bytes", MAX_OUTPUT_BYTES, 1),
                   known_hosts=known_hosts, host_keys=host_keys, no_instance_services=frozenset(marked),
                   enabled_status_command=enabled_status if marked else None, **commands)


def _host_keys(o: dict[str, Any]) -> tuple[str | None, tuple[str, ...]]:
    """known_hosts (a file) and/or host_key (one or more OpenSSH public key lines): at least one."""
    known_hosts, host_key = o.get("known_hosts"), o.get("host_key")
    if known_hosts is not None and (not isinstance(known_hosts, str) or not known_hosts):
        raise ConfigError("ssh: known_hosts must be the path of a known_hosts file")
    keys = [host_key] if isinstance(host_key, str) else host_key
    if keys is not None and (not isinstance(keys, list) or not keys or not all(isinstance(k, str) for k in keys)):
        raise ConfigError("ssh: host_key must be an OpenSSH public key line (or a list of them)")
    if known_hosts is not None and keys is not None:
        raise ConfigError("ssh: set known_hosts or host_key, not both")
    if known_hosts is None and keys is None:
        raise ConfigError("ssh: set known_hosts (a file) or host_key (the device's public host key): "
                          "the host key is always verified")
    return known_hosts, tuple(keys or ())


def check_service(opts: Options, service: str) -> None:
    """Refuse a service key before anything is sent."""
    if _CONTROL.search(service) or not opts.service_pattern.fullmatch(service):
        raise PermanentError(f"ssh: service key {clean(service, 100)!r} does not match service_pattern "
                             f"{clean(opts.service_pattern.pattern, 100)!r}")


def quote_routeros(value: str) -> str:
    """A RouterOS console string literal: backslash, quote, $ (variables) and ? (help) escaped."""
    return '"' + re.sub(r'[\\"$?]', lambda m: "\\" + m.group(), value) + '"'


def render(template: str, service: str, quote: str = "posix") -> str:
    """The command with every {service} replaced by the quoted key (other braces left alone)."""
    quoted = quote_routeros(service) if quote == "routeros" else shlex.quote(service)
    return template.replace("{service}", quoted)


def command_for(opts: Options, service: str, state: State | None) -> str:
    """The command that puts `service` into `state`, or reads it (state None)."""
    check_service(opts, service)
    template = {"on": opts.on_command, "off": opts.off_command, None: opts.status_command}[state]
    if state is None and service in opts.no_instance_services and opts.enabled_status_command:
        template = opts.enabled_status_command
    return render(template, service, opts.quote)


def state_of(opts: Options, result: Result, what: str) -> State:
    """The state a status command reported; anything else is an error quoting what the device said."""
    no_status = result.exit_status is None or result.exit_status < 0
    if no_status and (opts.on_pattern is None or not result.stdout.strip()):
        raise TransientError(f"{what}: the status command ended without an exit status (connection lost "
                             f"or killed by a signal)")
    if result.truncated:
        raise PermanentError(f"{what}: the status command printed more than {opts.max_output_bytes} bytes "
                             f"(max_output_bytes)")
    if opts.on_pattern is not None and opts.off_pattern is not None:
        text = result.stdout.decode(errors="replace")
        on, off = bool(opts.on_pattern.search(text)), bool(opts.off_pattern.search(text))
        if on != off:
            return "on" if on else "off"
        why = "both on_pattern and off_pattern" if on else "neither on_pattern nor off_pattern"
        if no_status:  # RouterOS may send no exit status: only the output can tell, and it did not
            raise TransientError(f"{what}: no exit status and the output matches {why}: {result.said()}")
        raise PermanentError(f"{what}: status output matches {why} (exit {result.exit_status}): {result.said()}")
    if result.exit_status == opts.status_on_exit:
        return "on"
    if result.exit_status == opts.status_off_exit:
        return "off"
    raise PermanentError(f"{what}: status exit {result.exit_status}, neither status_on_exit "
                         f"({opts.status_on_exit}) nor status_off_exit ({opts.status_off_exit}): {result.said()}")


def check_applied(opts: Options, result: Result, what: str) -> None:
    """Raise unless the on/off command succeeded: exit 0, and nothing matching fail_pattern."""
    status = result.exit_status
    if (status is None or status < 0) and opts.fail_pattern is not None:
        # RouterOS may close the channel without an exit status: its output says whether it failed, and
        # the executor's read-back says whether it worked
        text = (result.stdout + b"\n" + result.stderr).decode(errors="replace")
        if opts.fail_pattern.search(text):
            raise PermanentError(f"{what}: the device reported a failure: {clean(text.strip(), 200)}")
        return
    if status is None or status < 0 or status in TRANSIENT_EXITS:
        ended = "without an exit status" if status is None or status < 0 else f"with exit {status}"
        raise TransientError(f"{what}: the command ended {ended}: {result.said()}")
    if status != 0:
        raise PermanentError(f"{what}: exit {status}: {result.said()}")
    if opts.fail_pattern is not None:
        text = (result.stdout + b"\n" + result.stderr).decode(errors="replace")
        if opts.fail_pattern.search(text):
            raise PermanentError(f"{what}: the device reported a failure: {clean(text.strip(), 200)}")


def refused_hint(opts: Options, password: bool) -> str:
    """Why a RouterOS console may refuse a right password: once a user has an SSH public key imported,
    RouterOS takes only that key (unless always-allow-password-login is set)."""
    if not password or opts.quote != "routeros":
        return ""
    return ("; RouterOS refuses the password of a user who has an SSH public key imported (`/user ssh-keys print`): "
            "use that key's private key as the credential, or `/ip ssh set always-allow-password-login=yes`")


def is_private_key(secret: str) -> bool:
    """The credential is a private key (PEM/OpenSSH armour) rather than a password."""
    head = secret.lstrip()
    return head.startswith("-----BEGIN ") and "PRIVATE KEY-----" in head.split("\n", 1)[0]
