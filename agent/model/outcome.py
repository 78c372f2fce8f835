"""A delivery of a message, and its outcome: what the Reporter commits for it in one batch."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

Finish = Literal["archive", "retry", "park", "dead_letter", "move", "hold"]
LEAVES = ("archive", "dead_letter", "move")  # finishes that take the message off this queue


@dataclass
class Delivery:
    """A message as pgmq.read returned it."""

    msg_id: int
    read_ct: int
    enqueued_at: datetime
    raw: str
    headers: str | None
    version: int
    bounces: int = 0  # times it was parked: those deliveries were not attempts
    received: float = field(default_factory=time.monotonic)
    skew: float = 0.0  # the database's clock minus ours when it was read: not_after is judged by the database's
    priority: object = None  # its `priority` header as sent (see agent/model/priority.py)

    @property
    def attempt(self) -> int:
        return max(1, self.read_ct - self.bounces)


@dataclass
class StateUpdate:
    device: str
    service: str
    desired: str | None = None
    version: int | None = None
    observed: str | None = None
    observed_at: float | None = None   # unix times
    applied_at: float | None = None
    verified_at: float | None = None
    error: str | None = None
    msg_id: int | None = None
    request_id: str | None = None
    meta: dict[str, Any] | None = None
    failed: bool | None = None         # the command of this version was dead-lettered


@dataclass
class EventRow:
    kind: str
    device: str | None = None
    service: str | None = None
    msg_id: int | None = None
    version: int | None = None
    request_id: str | None = None
    desired: str | None = None
    observed: str | None = None
    attempt: int | None = None
    duration_ms: float | None = None
    error: str | None = None
    meta: dict[str, Any] | None = None
    applied_at: float | None = None  # when the device acknowledged this attempt's write (unix seconds)


@dataclass
class Outcome:
    delivery: Delivery
    finish: Finish
    events: list[EventRow] = field(default_factory=list)
    state: StateUpdate | None = None
    retry_delay: float = 0.0
    reason: str | None = None          # dead-letter reason, for people
    error_kind: str | None = None
    driver: str | None = None
    device: str | None = None
    bounce: bool = False               # back to the queue because its device was busy elsewhere
    sync: dict[str, Any] | None = None  # a reconcile message's findings (agent.sync_items, run counters)
    extra_states: list[StateUpdate] = field(default_factory=list)  # a reconcile reports several services
    reconcile: bool = False            # the outcome of a reconcile message, not of a command
    move_to: str | None = None         # move: the queue the message belongs on (agent/queue/routing.py)
    parked_reason: str | None = None   # park: the reason code kept in its headers (agent/executor/parklog.py)
    urgent: bool = False               # a high-priority command's: committed ahead of the others waiting
