"""The driver interface: turn (service, state) into device requests and replies into a state.

A driver is a class registered in the entry-point group `agent.drivers`. The daemon makes one
instance per driver name and passes the device on every call. Drivers raise only the errors in
agent.errors: TransientError (retry), PermanentError (dead-letter), UnreachableError (park).

Optional: `async read_many(device, services) -> {service: state or AgentError}` reads many
services in one request (coalesced commands and reconciliation use it), and
`can_read_many(device) -> bool` says whether it does so for this device (absent: always).
Optional: `async apply_many(device, {service: state}) -> {service: None or AgentError}` writes a
take's services in one call (one statement for many: the RADIUS policy at month-end).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from agent.errors import ConfigError
from agent.model.device import Device, State


class DriverContext:
    """What a driver may use from the agent: the device timeout and the credential store.

    The timeout is live: `device_timeout` is read at each use, from a source the daemon swaps on
    SIGHUP (AGENT_DEVICE_TIMEOUT changes without a restart), or a fixed number."""

    def __init__(self, device_timeout: float | Callable[[], float] = 10.0,
                 credentials: CredentialStore | None = None) -> None:
        self._timeout = device_timeout if callable(device_timeout) else (lambda: float(device_timeout))
        self.credentials = credentials

    @property
    def device_timeout(self) -> float:
        return self._timeout()


@runtime_checkable
class Driver(Protocol):
    name: str

    def validate_options(self, device: Device) -> None:
        """Raise ConfigError when the device's options cannot work with this driver."""

    async def read(self, device: Device, service: str) -> State:
        """The state of `service` on the device now."""

    async def apply(self, device: Device, service: str, state: State) -> None:
        """Ask the device to put `service` into `state`; the caller verifies by reading."""

    async def probe(self, device: Device) -> str | None:
        """Return when the device answers; raise UnreachableError/TransientError when not. May return
        what answered (e.g. "RouterOS 7.16 over REST (https)"), which `agentctl device test` shows."""

    async def close(self) -> None: ...


class CredentialStore:
    """Named secrets kept on the agent host: files in a directory, one per name.

    Looks in $CREDENTIALS_DIRECTORY (systemd LoadCredential=) first, then the configured
    directory. The value is returned to the driver and never logged or stored.
    """

    def __init__(self, directory: Path | None = None) -> None:
        dirs = [os.environ.get("CREDENTIALS_DIRECTORY"), directory]
        self._dirs = [Path(d) for d in dirs if d]

    def get(self, name: str) -> str:
        if not name or "/" in name or name.startswith("."):
            raise ConfigError(f"credential name {name!r} is not a plain file name")
        for d in self._dirs:
            path = d / name
            try:
                if path.is_file():
                    return path.read_text().rstrip("\n")
            except PermissionError:  # a configuration problem like a missing credential, not a passing one
                raise ConfigError(f"credential {name!r}: cannot read {path} (permission denied): make the directory "
                                  "and the file readable by the agent's user") from None
        where = ", ".join(str(d) for d in self._dirs) or "no credentials directory configured"
        raise ConfigError(f"credential {name!r} not found ({where})")

    def get_json(self, name: str) -> Any:
        text = self.get(name)
        try:
            return json.loads(text)
        except ValueError:
            return text
