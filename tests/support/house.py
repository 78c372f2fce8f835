"""A housekeeper built from plain figures: no Agent, no Postgres. Each part's figures are a value the
test sets (`Parts`), what systemd was told is recorded (`Told`)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any

from agent.db.queries import Queries
from agent.db.session import SessionFigures
from agent.executor.budgets import BudgetFigures
from agent.queue.consumer import ConsumerFigures
from agent.reconcile.reconciler import ReconcilerFigures
from agent.runtime.housekeeper import Housekeeper, Identity, Sources
from agent.runtime.systemd import Notifier
from agent.settings import LiveSettings
from agent.vpn.guard import VpnFigures

ME = Identity("a1", "north", "device_tasks", instance="i-1", host_id="gw1")


def idle() -> ConsumerFigures:
    return ConsumerFigures(inflight=0, wakeups={}, read_error=None, last_progress=time.monotonic(),
                           work_waits=False, last_cycle_wall=None, last_cycle_ms=None)


@dataclass
class Parts:
    """The figures each part would publish, as the test sets them."""

    consumer: ConsumerFigures = field(default_factory=idle)
    session: SessionFigures = field(default_factory=lambda: SessionFigures(connected=True, error=None, reconnects=0))
    vpn: VpnFigures = field(default_factory=lambda: VpnFigures(required=False, error=None, peers=(), reach={}))
    budgets: BudgetFigures = field(default_factory=lambda: BudgetFigures(devices=(), breakers={}, rate_waits={}))
    reconciler: ReconcilerFigures = field(default_factory=lambda: ReconcilerFigures(None, tables={}, pruned_at=None))
    leading: bool = False
    parked: int = 0

    def sources(self) -> Sources:
        return Sources(consumer=lambda: self.consumer, session=lambda: self.session, vpn=lambda: self.vpn,
                       budgets=lambda: self.budgets, reconciler=lambda: self.reconciler,
                       leading=lambda: self.leading, parked=lambda: self.parked)

    def consumer_now(self, **kw: Any) -> None:
        self.consumer = replace(self.consumer, **kw)


class Told(Notifier):
    """systemd as the housekeeper sees it: every notification is recorded, none is sent."""

    def __init__(self, watchdog_interval: float | None = None) -> None:
        super().__init__()
        self.socket_path = None
        self.watchdog_interval = watchdog_interval
        self.sent: list[tuple[str, ...]] = []

    def send(self, *fields: str) -> None:
        self.sent.append(fields)

    @property
    def pings(self) -> int:
        return sum(1 for f in self.sent if f == ("WATCHDOG=1",))


def live(heartbeat_interval: float = 30.0, watchdog_stall: float = 60.0) -> LiveSettings:
    """The live settings the housekeeper reads: its heartbeat interval and the watchdog's stall."""
    return LiveSettings(log_level="INFO", poll_interval=60.0, max_attempts=5, retry_base=1.0, retry_max=60.0,
                        device_timeout=10.0, heartbeat_interval=heartbeat_interval, watchdog_stall=watchdog_stall,
                        guard_window=3600.0, guard_off_min=0, guard_off_percent=100.0)


class NoDatabase:
    """A pool whose every connection attempt is refused."""

    def acquire(self, *_args: Any, **_kw: Any) -> Any:
        raise ConnectionRefusedError("connection refused")


def housekeeper(parts: Parts, told: Told | None = None, settings: LiveSettings | None = None) -> Housekeeper:
    now = settings or live()
    return Housekeeper(ME, parts.sources(), told or Told(), NoDatabase(),  # type: ignore[arg-type]
                       Queries(ME.queue), lambda: now)
