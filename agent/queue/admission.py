"""What a read row must be before anything else looks at it: pure checks on untrusted input.

The body's size was measured in SQL (bodies over the limit are not even fetched); the agent's own
headers (`origin_msg_id`, `bounces`, `rerouted_from`, `priority`) are validated like a command; a msg_id above the
sequence every agent queue draws from (agent.msg_id_seq) was forged past its trigger (a real one never is) and
would make every later command "superseded".
"""

from __future__ import annotations

import json
import time
from typing import Any

from agent.errors import PermanentError
from agent.model import priority
from agent.model.headers import parse_headers
from agent.model.outcome import Delivery
from agent.queue.routing import MARK, mark_problem

MAX_HEADER_BYTES = 8192


def delivery(row: Any, local_now: float | None = None) -> Delivery:
    """A Delivery from a read row; `skew` is the database clock minus ours at the read."""
    version, bounces = parse_headers(row["msg_id"], row["headers"])
    skew = 0.0
    db_now = row["db_now"] if "db_now" in row.keys() else None
    if db_now is not None:
        skew = db_now.timestamp() - (local_now if local_now is not None else time.time())
    return Delivery(row["msg_id"], row["read_ct"], row["enqueued_at"], row["message"], row["headers"],
                    version, bounces, skew=skew, priority=priority.header(row["headers"]))


def admit(row: Any, max_bytes: int) -> None:
    """Raise PermanentError with a reason a person can read when the row cannot be worked on."""
    if row["message"] is None and (row["size"] or 0) > max_bytes:
        raise PermanentError(f"message is {row['size']} bytes, over the {max_bytes}-byte limit (not fetched)")
    if row["headers"] is None and (row["headers_size"] or 0) > MAX_HEADER_BYTES:
        raise PermanentError(f"headers are {row['headers_size']} bytes, over the {MAX_HEADER_BYTES}-byte limit")
    last_id = row["last_id"]
    if last_id is not None and row["msg_id"] > last_id:
        raise PermanentError(f"msg_id {row['msg_id']} is above the newest queue id {last_id}: "
                             "not a real queue id (inserted by hand)")
    if problem := header_problem(row["msg_id"], row["headers"]):
        raise PermanentError(f"invalid headers: {problem}")


def header_problem(msg_id: int, headers: str | None) -> str | None:
    """What is wrong with the agent's own header keys, or None. Other keys are the producer's."""
    if headers is None:
        return None
    try:
        doc = json.loads(headers)
    except ValueError:
        return "not JSON"
    if doc is None:
        return None
    if not isinstance(doc, dict):
        return "must be a JSON object"
    origin = doc.get("origin_msg_id")
    if origin is not None and not (_is_int(origin) and 0 < origin <= msg_id):
        return f"origin_msg_id must be a queue id not above {msg_id}"
    bounces = doc.get("bounces")
    if bounces is not None and not (_is_int(bounces) and bounces >= 0):
        return "bounces must be a non-negative integer"
    if problem := priority.problem(doc.get("priority")):
        return problem
    if MARK in doc:
        return mark_problem(doc[MARK])
    return None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
