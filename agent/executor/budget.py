"""A budget per device, as pure decisions: a token bucket that spaces its operations (`max_rate`)
and a circuit breaker that stops hammering a device that stopped answering (`trip_after`,
`trip_cooldown`). The caller passes the clock and does the waiting, the probing and the parking
(agent/executor/budgets.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from agent.model.device import Device

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"
TRIP_AFTER = 5          # consecutive timeouts that open the breaker (0: never)
TRIP_COOLDOWN = 30.0    # seconds an open breaker parks the device's work before one probe decides


HEADROOM = 0.95  # the pace is a little under max_rate: network jitter must not put more into one second


class TokenBucket:
    """Device operations start at least 1/(HEADROOM * rate) seconds apart (a bucket of one token):
    never more than `rate` of them in any one-second window, also where the device sees them, their
    arrival shifted by network jitter of up to 5 % of a second."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.interval = 1.0 / (rate * HEADROOM)
        self._next = float("-inf")  # the earliest start of the next operation

    def reserve(self, now: float) -> float:
        """Take the next slot: how long to wait from `now` before the operation may start."""
        at = max(now, self._next)
        self._next = at + self.interval
        return at - now

    def started(self, now: float) -> None:
        """The operation started at `now` (a wait may overrun): the next one is spaced from then."""
        self._next = max(self._next, now + self.interval)


@dataclass
class Breaker:
    """Closed: calls go. `trip_after` timeouts in a row open it: the device's work parks for
    `cooldown` seconds; then (half-open) one probe decides: an answer closes it, no answer opens it
    for another cool-down. Any answer, an error too, resets the count: only silence trips it."""

    trip_after: int = TRIP_AFTER
    cooldown: float = TRIP_COOLDOWN
    state: str = CLOSED
    timeouts: int = 0       # in a row
    until: float = 0.0      # when an open breaker's cool-down ends (the caller's clock)
    trips: int = 0

    @property
    def closed(self) -> bool:
        return self.state == CLOSED

    def timed_out(self, now: float) -> bool:
        """A device call got no answer. True when this opens the breaker (a trip, or a failed probe)."""
        self.timeouts += 1
        if self.state == HALF_OPEN or (self.state == CLOSED and 0 < self.trip_after <= self.timeouts):
            self.state, self.until = OPEN, now + self.cooldown
            self.trips += 1
            return True
        return False

    def answered(self) -> bool:
        """A device call got an answer. True when this closes an open or half-open breaker."""
        was = self.state
        self.state, self.timeouts = CLOSED, 0
        return was != CLOSED

    def due(self, now: float) -> bool:
        """Open and its cool-down is over: time for the probe."""
        return self.state == OPEN and now >= self.until

    def probing(self) -> None:
        self.state = HALF_OPEN


def max_rate(device: Device) -> float | None:
    """The device's `max_rate` (operations a second), or None: no limit."""
    value = device.options.get("max_rate")
    return float(value) if isinstance(value, int | float) and _number(value) and value > 0 else None


def pace(device: Device) -> float:
    """Seconds between two operations on the device under its max_rate; 0 without one."""
    rate = max_rate(device)
    return 1.0 / (rate * HEADROOM) if rate else 0.0


def breaker_options(device: Device) -> tuple[int, float]:
    """(`trip_after`, `trip_cooldown`) of the device, the defaults where it has none."""
    after, cooldown = device.options.get("trip_after", TRIP_AFTER), device.options.get("trip_cooldown", TRIP_COOLDOWN)
    return (after if _number(after) and isinstance(after, int) else TRIP_AFTER,
            float(cooldown) if _number(cooldown) else TRIP_COOLDOWN)


def check_options(options: dict[str, Any]) -> str | None:
    """What is wrong with the budget options, or None."""
    rate = options.get("max_rate")
    if rate is not None and (not _number(rate) or not 0 < rate <= 10_000):
        return ("max_rate must be a number above 0 and at most 10000 (device operations per second; "
                "leave it out for no limit)")
    after = options.get("trip_after", TRIP_AFTER)
    if not _number(after) or not isinstance(after, int) or not 0 <= after <= 1000:
        return ("trip_after must be an integer from 0 to 1000 (timeouts in a row that open the device's "
                "breaker; 0: never)")
    cooldown = options.get("trip_cooldown", TRIP_COOLDOWN)
    if not _number(cooldown) or not 1 <= cooldown <= 86_400:
        return "trip_cooldown must be a number of seconds from 1 to 86400 (how long an open breaker parks the work)"
    return None


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value == value  # not NaN
