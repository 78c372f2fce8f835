"""Pure decisions of a reconcile: what a reading means, and how a run's findings are counted."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

Result = Literal["in_sync", "drift", "repaired", "unreadable", "failed"]


@dataclass
class Finding:
    service: str
    expected: str | None
    found: str | None
    result: Result
    error: str | None = None


def needs_repair(expected: str, readings: list[str], confirm: int) -> bool:
    """Drift is confirmed when the last `confirm` readings all differ from what is expected."""
    return len(readings) >= confirm and all(r != expected for r in readings[-confirm:])


def summary(findings: list[Finding]) -> dict[str, Any]:
    """The payload a finished reconcile message reports: counts, and every finding."""
    count = {r: sum(f.result == r for f in findings) for r in ("in_sync", "drift", "repaired", "unreadable", "failed")}
    return {
        "checked": len(findings),
        "in_sync": count["in_sync"],
        "drifted": count["drift"] + count["repaired"] + count["failed"],
        "repaired": count["repaired"],
        "unreadable": count["unreadable"],
        "failed": count["failed"],
        "items": [asdict(f) for f in findings],
    }
