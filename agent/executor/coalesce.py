"""Coalescing a device's lane (pure): which commands are taken together, and which of them are
superseded inside the take without touching the device.

A take is the run of `set` commands at the head of a lane, up to a bound; a refresh or a reconcile
message ends it (they run on their own, in order). Within a take, for each service only the newest
version goes to the device; older ones are recorded as superseded. The same message delivered
twice (a redelivery while the first is still in the lane) is kept once, as its newest delivery.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from agent.contract import Command
from agent.executor.reports import Delivery


class Item(Protocol):
    delivery: Delivery


class CommandItem(Item, Protocol):
    command: Command


C = TypeVar("C", bound=CommandItem)


@dataclass(frozen=True)
class Plan(Generic[C]):
    live: list[C]                       # newest per service: these go to the device
    superseded: list[tuple[C, int]]     # (item, the newer version in the take)
    stale: list[C]                      # older deliveries of a message delivered again


def head(lane: Iterable[Item], bound: int, is_set: type) -> int:
    """How many items at the head of the lane form one take (at least one)."""
    n = 0
    for item in lane:
        if n >= bound or not isinstance(item, is_set) or item.command.action != "set":  # type: ignore[attr-defined]
            break
        n += 1
    return max(n, 1)


def plan(items: Sequence[C]) -> Plan[C]:
    newest_delivery: dict[int, C] = {}
    for it in items:
        prev = newest_delivery.get(it.delivery.msg_id)
        if prev is None or it.delivery.read_ct > prev.delivery.read_ct:
            newest_delivery[it.delivery.msg_id] = it
    stale = [it for it in items if newest_delivery[it.delivery.msg_id] is not it]
    unique = [it for it in items if newest_delivery[it.delivery.msg_id] is it]
    newest: dict[str, int] = {}
    for it in unique:
        newest[it.command.service] = max(newest.get(it.command.service, 0), it.delivery.version)
    live: list[C] = []
    superseded: list[tuple[C, int]] = []
    for it in unique:
        top = newest[it.command.service]
        if it.delivery.version < top:
            superseded.append((it, top))
        else:
            live.append(it)  # (a replay beside its original has the same version: both go, one device write)
    return Plan(live, superseded, stale)
