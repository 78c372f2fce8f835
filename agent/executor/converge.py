"""The converge operation: make one service on one device match a desired state, and prove it.

Shared by commands and (later) periodic reconciliation. A write that answered OK is not
proof: success means a read-back that matches.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
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
    """Read the state, within `timeout`."""
    step = _Step()
    async with _guard(step, device, timeout):
        return await _observe(driver, device, service, step)


async def converge(driver: Driver, device: Device, service: str, desired: State, timeout: float) -> Observation:
    """Read; write only if different; read back. Raises TransientError when the read-back differs.

    `timeout` is per device call; the whole operation (at most three calls) gets three times it,
    under one timer rather than three (timers are a real cost at thousands of operations a second).
    """
    step = _Step()
    async with _guard(step, device, timeout, calls=3):
        before = await _observe(driver, device, service, step)
        if before.observed == desired:
            return Observation(desired, before.observed_at, None, before.observed_at)
        step.what = "apply"
        await driver.apply(device, service, desired)
        applied_at = _now()
        after = await _observe(driver, device, service, step)
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


class _Step:
    what = "read"


async def _observe(driver: Driver, device: Device, service: str, step: _Step) -> Observation:
    step.what = "read"
    state = await driver.read(device, service)
    if state not in ("on", "off"):
        raise PermanentError(f"driver {device.driver!r} returned {state!r} for {service} on {device.id}")
    return Observation(observed=state, observed_at=_now())


@contextlib.asynccontextmanager
async def _guard(step: _Step, device: Device, timeout: float, calls: int = 1) -> AsyncIterator[None]:
    """One deadline for the operation; driver failures become our error kinds, once, here."""
    try:
        async with asyncio.timeout(timeout * calls):
            yield
    except TimeoutError:
        raise TransientError(f"{step.what} on {device.id} timed out ({timeout:g}s per call)") from None
    except AgentError:
        raise
    except Exception as exc:  # a driver bug must not kill the daemon or lose the message
        raise TransientError(f"{step.what} on {device.id} failed: {type(exc).__name__}: {exc}") from exc
