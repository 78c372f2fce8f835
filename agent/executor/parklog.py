"""What a parked message leaves behind: one `parked` event and log line per message and reason, and
a summary line now and then, however long the wait.

A message whose device is unreachable is parked again about once a minute (policy.ParkPolicy), for
as long as the outage lasts. Each re-park used to write a log line and an audit row (480,000 of each
for 1,000 commands through an 8-hour outage). Now the reason last recorded for a message travels in
its headers (`parked_reason`, kept by the report statement as `bounces` is, so the decision survives
a restart and a hand-over to another agent), and a re-park for the same reason records nothing. An
attempt that fails clears it: a park after that is recorded again. Pure, apart from the clock the
caller passes in.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field

HEADER = "parked_reason"
MAX_CODE = 64
SUMMARY_EVERY = 300.0  # seconds: at most one summary line this often


def reason_code(why: str) -> str:
    """The kind of a park reason, what a change of reason is judged by: the text before its first
    colon (`peer_down: gw-north: handshake 200 s ago` is `peer_down`), bounded."""
    return why.split(":", 1)[0].strip()[:MAX_CODE] or "unknown"


def last_parked(headers: str | None) -> str | None:
    """The reason code recorded for this message when it was last parked, from its headers (any
    JSON: only a short string under HEADER counts)."""
    try:
        doc = json.loads(headers) if headers else None
    except ValueError:
        return None
    value = doc.get(HEADER) if isinstance(doc, dict) else None
    return value if isinstance(value, str) and 0 < len(value) <= MAX_CODE else None


def record(previous: str | None, why: str) -> bool:
    """Whether parking for `why` is recorded (event and log line): not when it was last parked for
    the same kind of reason."""
    return previous != reason_code(why)


@dataclass
class ParkSummary:
    """Counts parks between summaries: at most one line every `every` seconds, while parks go on."""

    every: float = SUMMARY_EVERY
    since: float | None = None
    messages: set[int] = field(default_factory=set)
    devices: set[str] = field(default_factory=set)
    reasons: Counter[str] = field(default_factory=Counter)

    def note(self, msg_id: int, device: str, code: str, now: float) -> str | None:
        """Count one park; the summary line when one is due (the counts start again then)."""
        if self.since is None:
            self.since = now
        if msg_id not in self.messages:
            self.reasons[code] += 1
        self.messages.add(msg_id)
        self.devices.add(device)
        if now - self.since < self.every:
            return None
        line = (f"{len(self.messages)} message(s) parked for {len(self.devices)} device(s) in the last "
                f"{now - self.since:.0f} s: " + ", ".join(f"{c} {n}" for c, n in self.reasons.most_common(5)))
        self.since, self.messages, self.devices, self.reasons = now, set(), set(), Counter()
        return line
