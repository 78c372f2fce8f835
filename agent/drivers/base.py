"""The driver interface: turn (service, state) into device requests and replies into a state.

A driver is a class registered in the entry-point group `agent.drivers`. The daemon makes one
instance per driver name and passes the device on every call. Drivers raise only the errors in
agent.errors: TransientError (retry), PermanentError (dead-letter), UnreachableError (park).

Optional capabilities, each a declared protocol that a driver has by having its method (the agent
asks with `isinstance`, never by looking for a name): `ReadsMany` reads many services in one
request (coalesced commands and reconciliation use it), and `CanReadMany` says whether it does so
for this device (absent: always; `reads_many` asks both); `AppliesMany` writes a take's services in
one call (one statement for many: the RADIUS policy at month-end); `ChecksPolicy` tells whether the
device's suspension policy blocks anyone (routeros).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from agent.errors import AgentError, ConfigError
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


@runtime_checkable
class ReadsMany(Protocol):
    async def read_many(self, device: Device, services: list[str]) -> Mapping[str, State | AgentError]:
        """The state of each of `services` in one request; a service it cannot read is its own error."""


@runtime_checkable
class CanReadMany(Protocol):
    def can_read_many(self, device: Device) -> bool:
        """Whether `read_many` reads many services of this device in one request (http: with a list_path)."""


@runtime_checkable
class AppliesMany(Protocol):
    async def apply_many(self, device: Device, wanted: Mapping[str, State]) -> Mapping[str, AgentError | None]:
        """Put each service into its state in one call; per service None (answered) or its error."""


@runtime_checkable
class ChecksPolicy(Protocol):
    async def check_policy(self, device: Device, services: Iterable[str]) -> list[str]:
        """Problems with the device's suspension policy, one sentence each; [] when all is well."""


def reads_many(driver: object, device: Device) -> bool:
    """The driver reads many services of this device in one request: it has `read_many` and, where
    it can say per device (`can_read_many`), says so for this one."""
    return isinstance(driver, ReadsMany) and (not isinstance(driver, CanReadMany) or driver.can_read_many(device))


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
