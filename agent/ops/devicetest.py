"""`agentctl device test ID [--service S]`: can the agent drive this device? Changes nothing.

Steps, in order, each ending in what was found or the exact error and its fix: the inventory entry,
the driver, the device's options, its credential (present; the value is never shown), a probe,
with --service a read of that service, and for a driver that can check it (routeros) the suspension
policy: every address list of the device's known services is used by an enabled firewall rule. A
step after a failed one is not run. Nothing here calls `apply`. The judging and formatting are pure;
`run` and `cli` do the I/O.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import asyncpg

from agent.cli.exits import NOT_FOUND
from agent.drivers.base import ChecksPolicy, CredentialStore, Driver, DriverContext
from agent.drivers.registry import load_driver
from agent.errors import AgentError, ConfigError, NoAnswerError, PermanentError, TransientError
from agent.inventory.cache import device_from_row, validate_with
from agent.model.device import Device
from agent.settings import Settings
from agent.text import clean

DEVICE = "SELECT id, driver, address, site, options::text AS options, credential FROM agent.devices WHERE id = $1"
KNOWN = "SELECT service FROM agent.service_state WHERE device = $1 ORDER BY service"
POLICY = "suspension policy"


@dataclass(frozen=True)
class Step:
    name: str
    ok: bool
    detail: str
    kind: str | None = None  # the error kind when it failed (agent.errors kinds, or "error")
    fix: str | None = None
    skipped: bool = False

    @property
    def word(self) -> str:
        return "PASS" if self.ok else "SKIP" if self.skipped else "FAIL"


@dataclass
class Result:
    device: str
    service: str | None
    steps: list[Step] = field(default_factory=list)
    state: str | None = None  # the service's state, when it was read

    @property
    def ok(self) -> bool:
        return all(s.ok for s in self.steps)


def fix_for(exc: BaseException, device: Device | None, service: str | None) -> str:
    """What the operator should do about an error from the named device."""
    dev = device.id if device else "the device"
    if isinstance(exc, PolicyError):
        return ("add an enabled firewall rule that uses each list named (filter, nat, mangle or raw), or stop "
                "suspending through it; `agentctl doctor` checks this for every device")
    if isinstance(exc, ConfigError):
        return (f"fix the option or credential it names: `agentctl device add {dev} --driver ... --option KEY=VALUE "
                f"--credential NAME` (a credential is a file of that name in $CREDENTIALS_DIRECTORY or "
                f"AGENT_CREDENTIALS_DIR)")
    if isinstance(exc, NoAnswerError | TimeoutError):
        return (f"check the VPN and {dev}'s address and port (`agentctl device list`), and that its firewall lets "
                f"this host in; run `agentctl doctor` to check the tunnel and routes")
    if isinstance(exc, PermanentError):
        what = f"the service key {service!r}" if service else "the request"
        return (f"check {what}: does the object exist on {dev}, and is the key written as docs/drivers.md says "
                f"for driver {device.driver if device else '?'}?")
    if isinstance(exc, TransientError):
        return f"{dev} answered with a temporary error: try again; if it persists, check the device itself"
    return "this looks like a driver bug: report it with this output"


def failed(name: str, exc: BaseException, device: Device | None, service: str | None) -> Step:
    kind = exc.kind if isinstance(exc, AgentError) else "no_answer" if isinstance(exc, TimeoutError) else "error"
    text = clean(str(exc) or type(exc).__name__)
    return Step(name, False, f"{kind}: {text}", kind, fix_for(exc, device, service))


def deadline(device: Device, default: float) -> float:
    """The longest one call may take: the agent's timeout or the device's own if longer, plus a margin
    so that the driver's own timeout error, not ours, is the one seen."""
    try:
        own = float(device.options.get("timeout", 0))
    except (TypeError, ValueError):
        own = 0.0
    return max(default, own) + 1.0


def describe(device: Device) -> str:
    where = f", address {clean(device.address, 200)}" if device.address else ""
    return f"driver {clean(device.driver, 100)}{where}, site {clean(device.site, 100)}"


def as_text(result: Result) -> str:
    lines = []
    for s in result.steps:
        lines.append(f"{s.word}  {s.name}: {s.detail}")
        if s.fix and not s.ok and not s.skipped:
            lines.append(f"      fix: {s.fix}")
    dev = clean(result.device, 200)
    lines.append(f"device {dev} can be driven" if result.ok else f"device {dev}: test failed")
    if result.ok and result.service is None:
        lines.append(f"no service was read: add --service KEY to read one (e.g. `agentctl device test {dev} "
                     "--service <key>`)")
    return "\n".join(lines)


def as_json(result: Result) -> str:
    doc: dict[str, Any] = {"ok": result.ok, "device": result.device, "service": result.service,
                           "state": result.state, "steps": [asdict(s) for s in result.steps]}
    return json.dumps(doc, indent=2)


def skip_rest(result: Result, names: list[str]) -> Result:
    done = {s.name for s in result.steps}
    result.steps += [Step(n, False, "not run: an earlier step failed", skipped=True) for n in names if n not in done]
    return result


def step_names(service: str | None) -> list[str]:
    return ["inventory", "driver", "options", "credential", "probe"] + ([read_step(service)] if service else [])


def read_step(service: str) -> str:
    return f"read {clean(service, 200)}"


# -- I/O ---------------------------------------------------------------------------------------


async def run(device: Device | None, device_id: str, service: str | None, context: DriverContext,
              known: Sequence[str] = ()) -> Result:
    """Every step against `device` (None: not in the inventory); never writes to the device. `known`:
    the device's services the agent has state for (agent.service_state), for the policy check."""
    result = Result(device_id, service)
    names = step_names(service)
    if device is None:
        result.steps.append(Step("inventory", False, f"no device {device_id!r} in agent.devices", "config",
                                 "list devices with `agentctl device list --all-sites`; add it with "
                                 "`agentctl device add`"))
        return skip_rest(result, names)
    result.steps.append(Step("inventory", True, f"found ({describe(device)})"))
    try:
        driver = load_driver(device.driver, context)
    except AgentError as exc:
        result.steps.append(failed("driver", exc, device, service))
        return skip_rest(result, names)
    try:
        await _drive(driver, device, service, context, result, [*known, *([service] if service else [])])
    finally:
        await driver.close()
    return skip_rest(result, names)


async def _drive(driver: Driver, device: Device, service: str | None, context: DriverContext,
                 result: Result, known: list[str]) -> None:
    result.steps.append(Step("driver", True, f"{driver.name} ({type(driver).__module__})"))
    steps = [("options", lambda: _validate(driver, device)), ("credential", lambda: _credential(device, context)),
             ("probe", lambda: _probe(driver, device, context))]
    if service:
        steps.append((read_step(service), lambda: _read(driver, device, service, context, result)))
    if isinstance(driver, ChecksPolicy):
        steps.append((POLICY, lambda: _policy(driver, device, known, context)))
    for name, step in steps:
        try:
            detail = await step()
        except Exception as exc:  # a driver bug must show up here, not as a traceback
            result.steps.append(failed(name, exc, device, service))
            return
        result.steps.append(Step(name, True, detail))


async def _validate(driver: Driver, device: Device) -> str:
    validate_with(driver, device)
    return "valid"


async def _credential(device: Device, context: DriverContext) -> str:
    if not device.credential:
        return "none named"
    if context.credentials is None:
        raise ConfigError(f"credential {device.credential!r} named but no credential store")
    context.credentials.get(device.credential)  # the value stays here: only its presence is reported
    return f"{clean(device.credential, 100)} present (value not shown)"


async def _probe(driver: Driver, device: Device, context: DriverContext) -> str:
    start = time.monotonic()
    async with asyncio.timeout(deadline(device, context.device_timeout)):
        found = await driver.probe(device)
    what = f": {clean(found, 200)}" if isinstance(found, str) and found else ""
    return f"answers ({time.monotonic() - start:.2f} s){what}"


async def _read(driver: Driver, device: Device, service: str, context: DriverContext, result: Result) -> str:
    async with asyncio.timeout(deadline(device, context.device_timeout)):
        state = await driver.read(device, service)
    result.state = clean(state, 20)
    return result.state


class PolicyError(ConfigError):
    """The device can be driven, but a suspension through it would block nobody."""


async def _policy(driver: ChecksPolicy, device: Device, known: list[str], context: DriverContext) -> str:
    async with asyncio.timeout(4 * deadline(device, context.device_timeout)):  # a print per rule table
        problems = await driver.check_policy(device, known)
    if problems:
        raise PolicyError("; ".join(clean(p, 400) for p in problems))
    return "every address list in use is used by an enabled firewall rule"


async def cli(conn: asyncpg.Connection, s: Settings, a: argparse.Namespace) -> int:
    """agentctl handler: load the device as agentd does, test it, print; exit 1 when a step failed, 4
    when there is no such device (agentctl's exit status for what a command names that does not exist)."""
    row = await conn.fetchrow(DEVICE, a.id)
    context = DriverContext(s.device_timeout, CredentialStore(s.credentials_dir))
    known = [r["service"] for r in await conn.fetch(KNOWN, a.id)] if row else []
    result = await run(device_from_row(row) if row else None, a.id, a.service, context, known)
    print(as_json(result) if a.json else as_text(result))
    return 0 if result.ok else 1 if row else NOT_FOUND
