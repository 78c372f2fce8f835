"""Sites: where a device that is not this site's lives."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Elsewhere:
    """A device of another site, the queue that site records (None: none), and whether that queue
    and its DLQ exist."""

    device: str
    site: str
    queue: str | None
    ready: bool = True
