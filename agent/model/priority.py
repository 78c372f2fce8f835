"""Which commands go first (pure): restores before everything else.

A message's priority is its `priority` header, "high" or "normal" (agent.enqueue sets it). A message
without one (a plain pgmq.send, an older producer) is high when it sets a service `on` (a restore)
and normal otherwise. The queue reads (queries.sql `read`, `read_devices`) and the queue's partial
index (`high_index`, migration 0016) decide by the same rule, written once as HIGH_SQL.
"""

from __future__ import annotations

import json

HIGH, NORMAL = "high", "normal"
PRIORITIES = (HIGH, NORMAL)

# The rule in SQL, over a queue table's row: the index predicate and the reads' filter must be this
# very text (the planner matches a partial index by it). Never NULL.
HIGH_SQL = ("coalesce(headers->>'priority' = 'high' OR (headers->>'priority' IS NULL AND message->>'state' = 'on'), "
            "false)")


def header(headers: str | None) -> object:
    """The `priority` header as sent (None when absent or the headers are not an object)."""
    if not headers:
        return None
    try:
        doc = json.loads(headers)
    except ValueError:
        return None
    return doc.get("priority") if isinstance(doc, dict) else None


def problem(value: object) -> str | None:
    """What is wrong with a `priority` header, or None."""
    if value is None or value in PRIORITIES:
        return None
    return "priority must be \"high\" or \"normal\""


def of(value: object, state: str | None) -> str:
    """The priority of a command: its header, else high for a restore (`on`) and normal otherwise."""
    if value is None:
        return HIGH if state == "on" else NORMAL
    return HIGH if value == HIGH else NORMAL
