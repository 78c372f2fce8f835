"""What a message's headers say: its version, how often it bounced, whether an operator released it."""

from __future__ import annotations

import json


def parse_headers(msg_id: int, headers: str | None) -> tuple[int, int]:
    """(version, bounces) from a message's headers.

    version: the command's place in enqueue order, its first msg_id, kept across DLQ replays and
    moves to another site's queue (all agent queues take their ids from one sequence).
    bounces: deliveries that were parked (device unreachable) and do not count as attempts.
    """
    try:
        doc = json.loads(headers) if headers else {}
    except ValueError:
        doc = {}
    if not isinstance(doc, dict):
        doc = {}
    origin, bounces = doc.get("origin_msg_id"), doc.get("bounces")
    version = origin if isinstance(origin, int) and not isinstance(origin, bool) and 0 < origin <= msg_id else msg_id
    return version, min(bounces, 1_000_000) if isinstance(bounces, int) and bounces > 0 else 0


def released(headers: str | None) -> bool:
    """Whether an operator released this held command (`agentctl guard release`): the guard lets it pass."""
    if not headers or '"guard"' not in headers:
        return False
    try:
        doc = json.loads(headers)
    except ValueError:
        return False
    return isinstance(doc, dict) and doc.get("guard") == "released"


def command_version(msg_id: int, headers: str | None) -> int:
    return parse_headers(msg_id, headers)[0]
