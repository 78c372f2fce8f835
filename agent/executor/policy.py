"""Pure decisions of the executor: what to do with a command, when to retry, what to record.

No I/O here: the executor asks these functions and then does what they say.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass
from datetime import datetime

from agent.contract import Command


class Verdict(enum.Enum):
    CONVERGE = "converge"      # set: make the device match the command
    REFRESH = "refresh"        # read the device and report, change nothing
    SUPERSEDED = "superseded"  # a newer command for this (device, service) was already accepted
    DUPLICATE = "duplicate"    # this request_id was already carried by another command
    EXPIRED = "expired"        # not_after passed before the command could run
    HELD = "held"              # an `off` the guard against mass suspension holds until an operator decides


@dataclass
class KeyState:
    """What the agent knows of one (device, service): the newest accepted command."""

    version: int = 0
    desired: str | None = None


def decide(cmd: Command, version: int, key: KeyState, request_version: int | None, now: datetime,
           held: bool = False) -> Verdict:
    """The verdict for one delivery, given the newest version accepted for its key (and whether the
    acceptance held it: an `off` one too many for the guard against mass suspension)."""
    if cmd.request_id is not None and request_version is not None and request_version != version:
        return Verdict.DUPLICATE
    if cmd.expired(now):
        return Verdict.EXPIRED
    if cmd.action == "refresh":
        return Verdict.REFRESH
    if version < key.version:
        return Verdict.SUPERSEDED
    if held:
        return Verdict.HELD
    return Verdict.CONVERGE


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 10
    base: float = 1.0
    cap: float = 300.0

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Exponential backoff with equal jitter: half fixed, half random, never above the cap."""
        full = min(self.cap, self.base * 2.0 ** min(max(0, attempt - 1), 60))  # capped before the power
        return full / 2 + (rng or random).uniform(0, full / 2)

    def exhausted(self, attempt: int) -> bool:
        return attempt >= self.max_attempts


@dataclass(frozen=True)
class Tuning:
    """The retry policy and device timeout in force, shared by commands and reconcile work: live
    settings, so the executor asks for them at each use (a reload gives a new one)."""

    policy: RetryPolicy
    device_timeout: float


@dataclass(frozen=True)
class ParkPolicy:
    """Backoff for work whose device is unreachable: capped, and it never runs out."""

    base: float = 2.0
    cap: float = 60.0

    def delay(self, bounces: int, rng: random.Random | None = None) -> float:
        full = min(self.cap, self.base * 2.0 ** min(max(0, bounces), 60))  # capped before the power
        return full / 2 + (rng or random).uniform(0, full / 2)
