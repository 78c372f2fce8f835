"""What the driver contract suite needs from a driver's test server.

Each driver has a module `tests/drivers/target_<driver>.py` with

    @contextlib.asynccontextmanager
    async def target(tmp_path: Path) -> AsyncIterator[Target]: ...

that stands up real server software (or, for RouterOS only, a documented fake), yields a Target,
and tears everything down afterwards. The suite in test_contract.py runs every check against it.

Optional fields (defaults keep older target modules working):
  bad_credential  a device like `device` whose credential names a wrong secret: the suite expects a
                  ConfigError and checks that neither secret shows in errors or logs
  skip            check name -> why this target cannot express the check (e.g. sim has no network)
  known_gaps      check name -> why the driver does not pass it yet; the check runs and must fail
                  (strict xfail), so a fixed gap shows up as XPASS until it is removed from here
  transport       "tcp" or "udp": how the driver reaches `device`. The suite runs every check twice, once
                  direct and once through a WAN-like link (tests/support/wan.py) put in front of `device`
                  (and of `bad_credential` when it has the same address): a TCP proxy that delivers late
                  and in MTU-sized segments, or a UDP relay that delays, drops and duplicates. None (no
                  network, or not said) skips the WAN run with that reason
  bulk            many existing services (a router with thousands of customers): the suite reads them
                  all at once (read_many where the driver has it) and compares each with `observe`, so
                  replies have a realistic size; empty skips that check
  observe_many    the real states of many services in one look (optional; without it `observe` is asked
                  for each, which is slow for a fake that scans its tables)
Check names are the contract test names without `test_` (test_contract.CHECKS lists them).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from agent.drivers.base import DriverContext
from agent.model.device import Device


@dataclass
class Target:
    driver: str
    context: DriverContext               # with a CredentialStore that holds the test secret
    device: Device                       # a working device entry pointing at the test server
    service: str                         # an existing service whose state can be toggled
    missing_service: str                 # valid syntax, but no such object on the device
    invalid_service: str                 # refused by the driver's key syntax before any I/O
    unreachable: Device                  # same driver, an address nothing answers on
    slow: Device                         # same driver, a server that accepts but never answers in time
    secrets: list[str]                   # the credential's secret values: must never appear in errors/logs
    observe: Callable[[str], Awaitable[str]]  # the real state of a service, read NOT through the driver
    fake_backed: bool = False            # True when the server is a fake written from vendor docs
    notes: dict[str, str] = field(default_factory=dict)
    bad_credential: Device | None = None
    skip: dict[str, str] = field(default_factory=dict)
    known_gaps: dict[str, str] = field(default_factory=dict)
    transport: str | None = None
    bulk: list[str] = field(default_factory=list)
    observe_many: Callable[[list[str]], Awaitable[dict[str, str]]] | None = None
