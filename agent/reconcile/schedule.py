"""AGENT_RECONCILE_SCHEDULE: a cron expression (five fields, e.g. `*/5 * * * *`), a plain interval
in seconds (`300`), or `off`. Pure: given a time, when is the next run."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from cronsim import CronSim, CronSimError


@dataclass(frozen=True)
class Schedule:
    text: str
    interval: float | None = None  # seconds, when not cron

    @property
    def off(self) -> bool:
        return self.text == "off"

    def next_after(self, now: datetime) -> datetime | None:
        """The first run strictly after `now` (an aware datetime), or None when off."""
        if self.off:
            return None
        if self.interval is not None:
            return now + timedelta(seconds=self.interval)
        return next(CronSim(self.text, now.replace(microsecond=0)))


def parse_schedule(text: str) -> Schedule:
    """Raise ValueError with a readable reason when `text` is none of the accepted forms."""
    text = " ".join(text.split()).lower()
    if text in ("off", "none", "false", "0"):
        return Schedule("off")
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        if seconds < 1:
            raise ValueError("an interval must be at least 1 second (or `off`)")
        return Schedule(text, seconds)
    if len(text.split()) != 5:
        raise ValueError(f"{text!r} is neither seconds, `off`, nor a five-field cron expression")
    try:
        next(CronSim(text, datetime(2000, 1, 1)))
    except (CronSimError, StopIteration) as exc:
        raise ValueError(f"bad cron expression {text!r}: {exc}") from None
    return Schedule(text)
