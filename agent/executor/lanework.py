"""The kinds of work a device's lane runs, and the registry the composition root fills with them.

Commands and reconcile messages today; more may come (held commands, batches). Each kind is a small
object: it recognises its messages, parses one (or refuses it with the reason), makes the lane item
once the device is known, runs the item in the lane, and says what becomes of a message whose device
this site does not have. The consumer asks the registry which kind a message is (the first kind
registered that recognises it); the executor asks an item's kind how to run it. Neither names a kind:
a new one is registered by the composition root (agent/runtime/daemon.py) and touches neither.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

from agent.errors import PermanentError
from agent.model.device import Device
from agent.model.outcome import Delivery, Outcome

NOT_RECOGNISED = "no kind of lane work recognises this message"


class Body(Protocol):
    """A parsed message: it names at least the device it is for."""

    @property
    def device(self) -> str: ...


class LaneItem(Protocol):
    """One message in its device's lane: what the executor asks of it."""

    delivery: Delivery
    device: Device

    @property
    def kind(self) -> LaneWork: ...

    @property
    def joins_take(self) -> bool:
        """A `set` command: taken together with those next to it, in one take (see coalesce)."""

    @property
    def high(self) -> bool:
        """A high-priority command (a restore): served ahead of the rest of its lane (coalesce.pick)."""

    @property
    def service(self) -> str | None:
        """The service it is for; None for the whole device."""

    @property
    def identities(self) -> dict[str, Any]:
        """Its identities in a log record: device, msg_id, and service and request_id where it has them."""


class LaneWork(Protocol):
    """One kind of lane work."""

    name: str
    reconcile: bool  # its outcomes are a reconcile run's (a bounced or broken one is settled as such)
    overtakes: bool  # runs ahead of long work that makes way for it between device calls (Executor.make_way)
    reroutes: bool  # a message for another site's device is moved to that site's queue, once

    def recognises(self, raw: str | None) -> bool:
        """Is this message body one of ours? Only a look at it: parsing judges it."""

    def parse(self, delivery: Delivery, raw: str | None) -> Body:
        """The parsed body, or PermanentError with a reason a person can read (it is dead-lettered)."""

    def item(self, delivery: Delivery, body: Any, device: Device) -> LaneItem:
        """The work its device's lane runs, once the device is known here."""

    def unknown_device(self, delivery: Delivery, body: Any, why: str) -> Outcome:
        """What becomes of the message when its device cannot be worked on here: `why` says why."""

    async def run(self, item: Any) -> Outcome:
        """Run the item in its lane (under the lane's slot and device claim); never a device op outside it."""

    def internal_error(self, item: Any, exc: Exception) -> Outcome:
        """The outcome when running the item hit a bug (`exc`): retried, never left leased without one."""


class LaneWorks:
    """The kinds of lane work, asked in the order they were registered: the first that recognises a
    message takes it. A kind that recognises every message (commands: the contract judges them) is
    registered last."""

    def __init__(self, *kinds: LaneWork) -> None:
        self._kinds: list[LaneWork] = []
        for kind in kinds:
            self.register(kind)

    def register(self, kind: LaneWork) -> None:
        if any(k.name == kind.name for k in self._kinds):
            raise ValueError(f"a kind of lane work named {kind.name!r} is registered already")
        self._kinds.append(kind)

    def recognise(self, raw: str | None) -> LaneWork:
        """The kind of this message body, or PermanentError (it is dead-lettered with the reason)."""
        for kind in self._kinds:
            if kind.recognises(raw):
                return kind
        raise PermanentError(f"{NOT_RECOGNISED} (known: {', '.join(k.name for k in self._kinds) or 'none'})")

    def __iter__(self) -> Iterator[LaneWork]:
        return iter(self._kinds)
