"""Coalescing a device's lane (pure): which commands are taken together, and in which order they
are judged.

A take is the run of `set` commands at the head of a lane, up to a bound; a refresh or a reconcile
message ends it (they run on their own, in order). High-priority commands (restores) waiting in the
lane go first, whatever waits before them (`pick`). The same message delivered twice (a redelivery
while the first is still in the lane) is kept once, as its newest delivery. Every other command of
the take is judged as if it ran alone, in version order: expired or not, then accepted or a
duplicate of its request_id; only then is an older command superseded, and only by the newest
version *accepted* for its key (the acceptance decides that, see acceptor.py). A newest command
that turns out expired or a duplicate therefore supersedes nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from agent.contract import Command
from agent.model.outcome import Delivery


class Item(Protocol):
    delivery: Delivery

    @property
    def joins_take(self) -> bool:
        """A `set` command: it may be taken with the others (see agent/executor/lanework.py)."""

    @property
    def high(self) -> bool:
        """A high-priority command: it goes first."""


class CommandItem(Item, Protocol):
    command: Command


C = TypeVar("C", bound=CommandItem)
L = TypeVar("L", bound=Item)


@dataclass(frozen=True)
class Plan(Generic[C]):
    commands: list[C]   # one per message, in version order (then msg_id): each is judged
    stale: list[C]      # older deliveries of a message delivered again: fenced out, nothing to report


def head(lane: Iterable[Item], bound: int) -> int:
    """How many items at the head of the lane form one take (at least one)."""
    n = 0
    for item in lane:
        if n >= bound or not item.joins_take:
            break
        n += 1
    return max(n, 1)


def pick(lane: Sequence[L], bound: int) -> list[L]:
    """The items of the lane that form its next take. While a high-priority `set` command waits
    anywhere in the lane, the `set` commands for its service go first (for the services of up to
    `bound` of them), in lane order and up to the bound: commands for one service still take effect
    in enqueue order, and newest-wins judges them as it always did (an older `off` taken with the
    newer `on` is superseded by it). Otherwise the head of the lane (see `head`)."""
    first = [it for it in lane if it.joins_take and it.high][:bound]
    if not first:
        return list(lane)[:head(lane, bound)]
    services = {it.command.service for it in first}  # type: ignore[attr-defined]  # only commands join a take
    return [it for it in lane if it.joins_take and it.command.service in services][:bound]  # type: ignore[attr-defined]


def plan(items: Sequence[C]) -> Plan[C]:
    newest_delivery: dict[int, C] = {}
    for it in items:
        prev = newest_delivery.get(it.delivery.msg_id)
        if prev is None or it.delivery.read_ct > prev.delivery.read_ct:
            newest_delivery[it.delivery.msg_id] = it
    stale = [it for it in items if newest_delivery[it.delivery.msg_id] is not it]
    commands = sorted(newest_delivery.values(), key=lambda it: (it.delivery.version, it.delivery.msg_id))
    return Plan(commands, stale)
