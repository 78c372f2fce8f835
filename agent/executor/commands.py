"""Device commands as lane work: the producer's messages (contract v1), run by the executor.

Commands are registered last (agent/runtime/daemon.py): a message no other kind claims is taken for
a command and the contract judges it, so a body that is none is dead-lettered with the contract's
reason. A command for another site's device is moved to that site's queue; one for a device no site
has is dead-lettered.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from agent.contract import MAX_MESSAGE_BYTES, Command, parse_command
from agent.executor.lanework import LaneWork
from agent.model import priority
from agent.model.device import Device
from agent.model.outcome import Delivery, EventRow, Outcome

log = logging.getLogger("agent.executor")


@dataclass
class Work:
    """A command in its device's lane."""

    delivery: Delivery
    command: Command
    device: Device
    kind: LaneWork

    high: bool = field(init=False)  # a high-priority `set` command (a restore, unless its producer said otherwise)

    def __post_init__(self) -> None:  # asked several times per command on the hot path; neither part of it changes
        self.high = self.command.action == "set" and \
            priority.of(self.delivery.priority, self.command.state) == priority.HIGH

    @property
    def joins_take(self) -> bool:
        return self.command.action == "set"

    @property
    def service(self) -> str:
        return self.command.service

    @property
    def identities(self) -> dict[str, Any]:
        return {"device": self.command.device, "service": self.command.service, "msg_id": self.delivery.msg_id,
                "request_id": self.command.request_id}


class Commands:
    """The kind of lane work a command is; the executor runs it (`Executor.commands`)."""

    name = "command"
    reconcile = False
    overtakes = True  # a reconcile message lets the commands waiting in its lane run before each service
    reroutes = True

    def __init__(self, run: Callable[[Work], Awaitable[Outcome]], failed: Callable[[Work, Exception], Outcome],
                 max_bytes: int = MAX_MESSAGE_BYTES) -> None:
        self._run = run
        self._failed = failed
        self._max_bytes = max_bytes

    def recognises(self, raw: str | None) -> bool:
        return True  # the contract judges it

    def parse(self, delivery: Delivery, raw: str | None) -> Command:
        return parse_command(raw, self._max_bytes)

    def item(self, delivery: Delivery, body: Command, device: Device) -> Work:
        return Work(delivery, body, device, self)

    def unknown_device(self, delivery: Delivery, body: Command, why: str) -> Outcome:
        return refused(delivery, why, body)

    async def run(self, item: Work) -> Outcome:
        return await self._run(item)

    def internal_error(self, item: Work, exc: Exception) -> Outcome:
        return self._failed(item, exc)


def refused(delivery: Delivery, reason: str, command: Command | None = None) -> Outcome:
    """Dead-lettered before its lane (a bad body, an unknown device, a move refused), with the reason."""
    ev = EventRow("dead_lettered", error=reason, msg_id=delivery.msg_id, version=delivery.version,
                  attempt=delivery.attempt)
    if command is not None:
        ev.device, ev.service, ev.request_id = command.device, command.service, command.request_id
    log.warning("dead-lettered: %s", reason, extra={"action": "dead_lettered", "msg_id": delivery.msg_id,
                                                    "device": ev.device, "service": ev.service})
    return Outcome(delivery, "dead_letter", [ev], reason=reason, error_kind="permanent")
