"""Where a command goes when its device belongs to another site: moved once to that site's queue,
dead-lettered with the reason otherwise. Pure decisions; the Reporter does the move.

A move sends the same body to the right queue and removes it from this one in the Reporter's
statement, through agent.move_message (an agent may send to no queue but its own: that function
checks the target is the queue of the device's site), marking the copy with `rerouted_from`. A
marked message that is misrouted again is not moved a second time, so two agents that disagree
about a device never pass it back and forth. The copy keeps its version (`origin_msg_id`: every agent
queue takes its ids from one sequence, so versions compare across queues, and a command moved late
does not overtake one sent to the right queue meanwhile); its `bounces` stay behind, a count of this
queue's deliveries.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from agent.contract import Command
from agent.model.outcome import Delivery, EventRow, Outcome
from agent.model.sites import Elsewhere

MARK = "rerouted_from"
NOT_CARRIED = ("origin_msg_id", "bounces")  # replaced on the copy by agent.move_message (the version kept)


@dataclass(frozen=True)
class Move:
    to: str
    headers: dict[str, Any]  # the mark the copy carries on the target queue (agent.move_message writes it)


def route(d: Delivery, here: str, site: str, where: Elsewhere) -> Move | str:
    """Move the delivery to its device's site queue, or say why not (the dead-letter reason)."""
    dev = f"device {where.device!r} belongs to site {where.site!r}"
    if where.queue is None:
        return (f"{dev}, which has no queue recorded: run `agentctl db init --site {where.site} --queue <name>`, "
                "then replay this from the DLQ")
    if not where.ready:
        return (f"{dev}, whose queue {where.queue!r} does not exist: run `agentctl db init --site {where.site} "
                f"--queue {where.queue}`, then replay this from the DLQ")
    if where.queue == here:
        return f"{dev}, whose queue is this one ({here!r}): run that site's agents with AGENT_SITE={where.site}"
    if (came := moved_from(d.headers)) is not None:
        return (f"{dev} (queue {where.queue!r}), but this message was already moved once (from queue {came!r}): "
                "it is not moved again")
    return Move(where.queue, {MARK: {"queue": here, "site": site, "msg_id": d.msg_id}})


def moved_from(headers: str | None) -> str | None:
    """The queue a message was moved from, if it was moved (headers were admitted already)."""
    try:
        doc = json.loads(headers) if headers else None
    except ValueError:
        return None
    mark = doc.get(MARK) if isinstance(doc, dict) else None
    return str(mark.get("queue")) if isinstance(mark, dict) else None


def mark_problem(value: object) -> str | None:
    """What is wrong with a `rerouted_from` header, or None (admission refuses a bad one)."""
    if not isinstance(value, dict) or not isinstance(value.get("queue"), str):
        return f"{MARK} must be an object naming the queue"
    return None


def moved(d: Delivery, c: Command, move: Move, here: str, to_site: str) -> Outcome:
    """The outcome that moves a command: one `rerouted` event names both queues."""
    ev = EventRow("rerouted", device=c.device, service=c.service, msg_id=d.msg_id, version=d.version,
                  request_id=c.request_id, attempt=d.attempt,
                  meta={"from_queue": here, "to_queue": move.to, "to_site": to_site})
    return Outcome(d, "move", [ev], device=c.device, move_to=move.to)
