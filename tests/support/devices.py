"""A scripted simulated device for in-process tests: the far edge, and only that is fake."""

from __future__ import annotations

import asyncio
from collections import defaultdict, deque
from dataclasses import dataclass, field

from agent.drivers.base import DriverContext
from agent.errors import AgentError, PermanentError, TransientError
from agent.model.device import Device, State


@dataclass
class Call:
    op: str
    device: str
    service: str
    state: str | None = None


@dataclass
class ScriptedDriver:
    """Devices whose next failures, latency and lies a test scripts ahead.

    `fail(dev, svc, TransientError("x"), times=2)` fails the next two writes on that key (`on="read"`:
    its next reads of that service alone);
    `lie(dev, svc)` makes the next apply answer OK without changing anything.
    """

    name: str = "scripted"
    states: dict[tuple[str, str], State] = field(default_factory=dict)
    calls: list[Call] = field(default_factory=list)
    latency: dict[str, float] = field(default_factory=dict)
    _failures: dict[tuple[str, str, str], deque[AgentError]] = field(default_factory=lambda: defaultdict(deque))
    _lies: set[tuple[str, str]] = field(default_factory=set)
    active: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    max_active: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def __call__(self, context: DriverContext | None = None) -> ScriptedDriver:
        return self

    def fail(self, device: str, service: str, error: AgentError, times: int = 1, on: str = "apply") -> None:
        self._failures[(device, service, on)].extend([error] * times)

    def lie(self, device: str, service: str) -> None:
        self._lies.add((device, service))

    def writes(self, device: str, service: str) -> list[str | None]:
        return [c.state for c in self.calls if c.op == "apply" and (c.device, c.service) == (device, service)]

    def validate_options(self, device: Device) -> None:
        pass

    async def read(self, device: Device, service: str) -> State:
        await self._call("read", device, service)
        return self.states.get((device.id, service), "off")

    async def apply(self, device: Device, service: str, state: State) -> None:
        await self._call("apply", device, service, state)
        if (device.id, service) in self._lies:
            self._lies.discard((device.id, service))
            return
        self.states[(device.id, service)] = state

    async def probe(self, device: Device) -> None:
        await self._call("probe", device, "")

    async def close(self) -> None:
        pass

    async def _call(self, op: str, device: Device, service: str, state: str | None = None) -> None:
        self.active[device.id] += 1
        self.max_active[device.id] = max(self.max_active[device.id], self.active[device.id])
        try:
            self.calls.append(Call(op, device.id, service, state))
            if self.latency.get(device.id):
                await asyncio.sleep(self.latency[device.id])
            queue = self._failures.get((device.id, service, op))
            if queue:
                raise queue.popleft()
        finally:
            self.active[device.id] -= 1


@dataclass
class BatchDriver(ScriptedDriver):
    """A ScriptedDriver that reads many services in one call (`read_many`), as a RouterOS print or
    an SNMP GET of many OIDs does; `fail_reads(dev, error)` fails the next batch read as a whole,
    and it notes whether a read ever overlapped a write on the same device."""

    read_overlapped_write: bool = False
    _read_failures: dict[str, deque[AgentError]] = field(default_factory=lambda: defaultdict(deque))
    _writing: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def fail_reads(self, device: str, error: AgentError, times: int = 1) -> None:
        self._read_failures[device].extend([error] * times)

    async def read_many(self, device: Device, services: list[str]) -> dict[str, State | AgentError]:
        if self._writing[device.id]:
            self.read_overlapped_write = True
        await self._call("read_many", device, ",".join(services))
        if self._read_failures[device.id]:
            raise self._read_failures[device.id].popleft()
        return {svc: self.states.get((device.id, svc), "off") for svc in services}

    async def apply(self, device: Device, service: str, state: State) -> None:
        self._writing[device.id] += 1
        try:
            await super().apply(device, service, state)
        finally:
            self._writing[device.id] -= 1

    def batch_reads(self, device: str) -> int:
        return sum(1 for c in self.calls if c.op == "read_many" and c.device == device)


__all__ = ["ScriptedDriver", "BatchDriver", "Call", "TransientError", "PermanentError"]
