"""The converge operation: make one service on one device match a desired state, and prove it.

Shared by commands and (later) periodic reconciliation. A write that answered OK is not
proof: success means a read-back that matches.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import datetime, timezone

from agent.drivers.base import Device, Driver, State
from agent.errors import AgentError, PermanentError, TransientError


@dataclass(frozen=True)
class Observation:
    observed: State
    observed_at: datetime
    applied_at: datetime | None = None   # set when a write was needed and answered OK
    verified_at: datetime | None = None  # set when a read-back matched desired


def _now() -> datetime:
    return datetime.now(timezone.utc)


async def observe(driver: Driver, device: Device, service: str, timeout: float) -> Observation:
    state = await _call(driver.read(device, service), timeout, device, "read")
    _check_state(state, device, service)
    return Observation(observed=state, observed_at=_now())


async def converge(driver: Driver, device: Device, service: str, desired: State, timeout: float) -> Observation:
    """Read; write only if different; read back. Raises TransientError when the read-back differs."""
    before = await observe(driver, device, service, timeout)
    if before.observed == desired:
        return Observation(desired, before.observed_at, None, before.observed_at)
    await _call(driver.apply(device, service, desired), timeout, device, "apply")
    applied_at = _now()
    after = await observe(driver, device, service, timeout)
    if after.observed != desired:
        raise VerifyError(
            f"verification failed: wrote {desired!r} to {service} on {device.id}, "
            f"read back {after.observed!r}", applied_at=applied_at, observed=after.observed)
    return Observation(desired, after.observed_at, applied_at, after.observed_at)


class VerifyError(TransientError):
    """The device accepted the write but reads back something else."""

    def __init__(self, message: str, applied_at: datetime, observed: State) -> None:
        super().__init__(message)
        self.applied_at = applied_at
        self.observed = observed


async def _call(coro, timeout: float, device: Device, what: str):  # type: ignore[no-untyped-def]
    try:
        async with asyncio.timeout(timeout):
            return await coro
    except TimeoutError:
        raise TransientError(f"{what} on {device.id} timed out after {timeout:g}s") from None
    except AgentError:
        raise
    except Exception as exc:  # a driver bug must not kill the daemon or lose the message
        raise TransientError(f"{what} on {device.id} failed: {type(exc).__name__}: {exc}") from exc


def _check_state(state: object, device: Device, service: str) -> None:
    if state not in ("on", "off"):
        raise PermanentError(f"driver {device.driver!r} returned {state!r} for {service} on {device.id}")
