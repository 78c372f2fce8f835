"""systemd's watchdog: whether the agent is stalled, decided apart from the pings (agent.runtime.housekeeper).

WATCHDOG=1 stops only when the agent is stalled: work waits (messages in flight, a backlog, a read
under way) and nothing has progressed for AGENT_WATCHDOG_STALL seconds. Progress is counted where it
happens (agent.queue.consumer.Consumer.progressed): every read, also one the database fails (an
outage is not a stall: a restart would not mend it), every dispatch, every committed outcome and
every attempt to commit one. An idle agent, a backlog being worked through and an outage all keep
the watchdog fed; a hung consumer, or work that nothing moves any more, does not.
"""

from __future__ import annotations


def stalled(now: float, last_progress: float, work_waits: bool, stall: float) -> bool:
    """True when work waits and the last progress is `stall` seconds old or older (monotonic seconds)."""
    return work_waits and now - last_progress >= stall
