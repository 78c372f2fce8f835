"""`sim`: a simulated device with configurable latency and failures, for the demo and tests.

Options (all optional):
  latency        seconds each call takes (float, default 0)
  failure_rate   probability 0..1 that a call fails (default 0)
  failure_kind   "transient" (default) or "permanent"
  initial        state of a service never set before: "off" (default) or "on"
  state_file     JSON file {service: state} holding the device's state, so that another
                 process (a test, an operator) can see it and change it behind the agent's back;
                 calls that overlap another call on the same device are logged to <state_file>.overlaps
  seed           seed of the failure draw, for repeatable runs
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import random
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from agent.drivers.base import DriverContext
from agent.errors import AgentError, ConfigError, PermanentError, TransientError
from agent.model.device import Device, State
from agent.model.names import SERVICE_PATTERN
from agent.text import clean

_KINDS = {"transient": TransientError, "permanent": PermanentError}


class SimDriver:
    name = "sim"

    def __init__(self, context: DriverContext | None = None) -> None:
        self._states: dict[tuple[str, str], State] = {}
        self._rngs: dict[str, random.Random] = {}
        self.calls = 0

    def validate_options(self, device: Device) -> None:
        opts = device.options
        unknown = set(opts) - {"latency", "failure_rate", "failure_kind", "initial", "state_file", "seed"}
        if unknown:
            raise ConfigError(f"sim: unknown option(s) {', '.join(sorted(unknown))}")
        _number(opts, "latency", 0.0, 0.0, 60.0)
        _number(opts, "failure_rate", 0.0, 0.0, 1.0)
        if opts.get("failure_kind", "transient") not in _KINDS:
            raise ConfigError('sim: failure_kind must be "transient" or "permanent"')
        if opts.get("initial", "off") not in ("on", "off"):
            raise ConfigError('sim: initial must be "on" or "off"')

    async def read(self, device: Device, service: str) -> State:
        _check(service)
        path = device.options.get("state_file")
        with _in_use(path):
            await self._call(device)
            if path:
                return _load(Path(path)).get(service, device.options.get("initial", "off"))
            return self._states.get((device.id, service), device.options.get("initial", "off"))

    async def read_many(self, device: Device, services: list[str]) -> dict[str, State | AgentError]:
        """Many services in one call (one latency), as a device with a list endpoint answers."""
        out: dict[str, State | AgentError] = {}
        for service in services:
            try:
                _check(service)
            except PermanentError as exc:
                out[service] = exc
        path = device.options.get("state_file")
        with _in_use(path):
            await self._call(device)
            known = _load(Path(path)) if path else {}
            for service in services:
                if service not in out:
                    out[service] = (known.get(service) if path else self._states.get((device.id, service))) \
                        or device.options.get("initial", "off")
        return out

    async def apply(self, device: Device, service: str, state: State) -> None:
        _check(service)
        path = device.options.get("state_file")
        with _in_use(path):
            await self._call(device)
            if path:
                _update(Path(path), service, state)
            else:
                self._states[(device.id, service)] = state

    async def probe(self, device: Device) -> None:
        await self._call(device)

    async def close(self) -> None:
        self._states.clear()

    async def _call(self, device: Device) -> None:
        self.calls += 1
        opts = device.options
        latency = float(opts.get("latency", 0))
        if latency:
            await asyncio.sleep(latency)
        rate = float(opts.get("failure_rate", 0))
        if rate and self._rng(device).random() < rate:
            kind = opts.get("failure_kind", "transient")
            raise _KINDS[kind](f"sim: injected {kind} failure on {device.id}")

    def _rng(self, device: Device) -> random.Random:
        rng = self._rngs.get(device.id)
        if rng is None:
            rng = self._rngs[device.id] = random.Random(device.options.get("seed"))
        return rng


@contextlib.contextmanager
def _in_use(path: str | None) -> Iterator[None]:
    """A device serves one operation at a time: with a state file, a call that starts while another
    is under way (from any process) is recorded in `<state_file>.overlaps` for tests to see."""
    if not path:
        yield
        return
    marker = f"{path}.busy"
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        with open(f"{path}.overlaps", "a") as f:
            f.write(f"{os.getpid()} {time.time():.3f}\n")
        yield
        return
    os.close(fd)
    try:
        yield
    finally:
        os.unlink(marker)


_SERVICE = re.compile(SERVICE_PATTERN)


def _check(service: str) -> None:
    if not isinstance(service, str) or not _SERVICE.fullmatch(service):
        raise PermanentError(f"sim: service key {clean(service, 100)!r} is not a valid service key")


def _number(opts: dict[str, Any], key: str, default: float, low: float, high: float) -> None:
    try:
        value = float(opts.get(key, default))
    except (TypeError, ValueError):
        raise ConfigError(f"sim: {key} must be a number") from None
    if not low <= value <= high:
        raise ConfigError(f"sim: {key} must be between {low} and {high}")


def _load(path: Path) -> dict[str, State]:
    try:
        with path.open() as f:
            fcntl.flock(f, fcntl.LOCK_SH)
            return json.load(f)
    except FileNotFoundError:
        return {}
    except ValueError as exc:
        raise TransientError(f"sim: state file {path} unreadable: {exc}") from None


def _update(path: Path, service: str, state: State) -> None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    with os.fdopen(fd, "r+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        text = f.read()
        data = json.loads(text) if text.strip() else {}
        data[service] = state
        f.seek(0)
        f.truncate()
        json.dump(data, f)
