"""Argument types for the command lines: bad input is an argparse error (usage, exit 2), never a
traceback."""

from __future__ import annotations

import argparse
import json
import re
from datetime import datetime, timedelta, timezone
from typing import Any

from agent.settings import QUEUE_PATTERN

_AGO = re.compile(r"^(\d+)\s*([smhd])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def timestamp(text: str) -> datetime:
    """An RFC 3339 time with an offset (or Z), e.g. 2026-03-01T12:00:00Z."""
    try:
        value = datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an RFC 3339 time; write e.g. 2026-03-01T12:00:00Z or 2026-03-01T13:00:00+01:00"
        ) from None
    if value.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{text!r} has no offset; add Z (UTC) or e.g. +01:00")
    return value


def since(text: str, now: datetime | None = None) -> datetime:
    """A time as `timestamp` accepts it, or an age: 30m, 12h, 7d."""
    if m := _AGO.match(text.strip()):
        return (now or datetime.now(timezone.utc)) - timedelta(**{_UNITS[m.group(2)]: int(m.group(1))})
    try:
        return timestamp(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither an age (30m, 12h, 7d) nor an RFC 3339 time (2026-03-01T12:00:00Z)") from None


def json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc}); write e.g. '{{\"invoice\": 42}}'") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object, e.g. '{\"invoice\": 42}'")
    return value


def queue_name(text: str) -> str:
    """A PGMQ queue name as AGENT_QUEUE accepts it, never a dead-letter queue's."""
    if not re.match(QUEUE_PATTERN, text) or text.endswith("_dlq"):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a queue name: lower-case letters, digits and _, at most 40, not ending in _dlq")
    return text
