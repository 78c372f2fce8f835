"""One logging vocabulary: every record carries `action` and, where they apply, device, service,
msg_id, request_id and outcome. Plain text or JSON lines on stdout (AGENT_LOG_FORMAT), or the
journal when systemd connected our stderr to it."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from typing import TextIO

from agent.text import clean, rfc3339

FIELDS = ("action", "device", "service", "msg_id", "request_id", "attempt", "duration_ms", "changed",
          "observed", "error", "site", "queue", "source", "msg_ids", "channels", "batch", "migration", "run")


def _extra(record: logging.LogRecord) -> dict[str, object]:
    return {k: getattr(record, k) for k in FIELDS if getattr(record, k, None) is not None}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {"ts": rfc3339(record.created),
               "level": record.levelname.lower(), "logger": record.name, "msg": record.getMessage(),
               **_extra(record)}
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


class PlainFormatter(logging.Formatter):
    """One line per record: the message and every field are escaped, so text from a message or a
    device (a request_id with a newline, a reply with ANSI escapes) can neither forge a line nor
    drive the terminal. Only a traceback spans lines."""

    def format(self, record: logging.LogRecord) -> str:
        ts = rfc3339(record.created)  # date and zone: a line read next week, or in another zone, is unambiguous
        fields = " ".join(f"{k}={clean(v, 1000)}" for k, v in _extra(record).items() if k != "action")
        action = clean(getattr(record, "action", "-"), 40)
        line = f"{ts} {record.levelname:<7} {action:<14} {clean(record.getMessage(), 4000)}"
        if fields:
            line += f"  [{fields}]"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def stream_is_journal(journal_stream: str | None, stream: TextIO) -> bool:
    """Whether `stream` is the one systemd connected to the journal: JOURNAL_STREAM names its
    device:inode. A child that inherited the variable but writes elsewhere (a shell redirect, a
    pipe) must keep writing there, or its output vanishes."""
    if not journal_stream:
        return False
    try:
        dev, _, ino = journal_stream.partition(":")
        st = os.fstat(stream.fileno())
        return (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (ValueError, OSError, AttributeError):
        return False


def _journal() -> logging.Handler | None:
    """systemd-python's JournalHandler when our stderr is the journal stream: each record's fields
    (ACTION=, DEVICE=, SERVICE=, MSG_ID=, REQUEST_ID=, ...), CODE_FILE/LINE/FUNC and tracebacks
    reach the journal as structured data."""
    if not stream_is_journal(os.environ.get("JOURNAL_STREAM"), sys.stderr):
        return None
    try:
        from systemd.journal import JournalHandler
    except ImportError:
        return None
    handler: logging.Handler = JournalHandler(SYSLOG_IDENTIFIER="agentd")
    handler.addFilter(JournalFields())
    return handler


class JournalFields(logging.Filter):
    """journald keeps only upper-case field names (it drops `action=`): each of our fields goes as
    ACTION=, DEVICE=, MSG_ID=, ..., text escaped as in the plain format."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in _extra(record).items():
            setattr(record, key.upper(), clean(value, 1000))
        return True


class PoolOutageFilter(logging.Filter):
    """asyncpg's pool logs a traceback each time it fails to refill during a database outage (every
    second or two). One line per state change instead: the first failure, then only when the error
    changes; a failure after `quiet` seconds without one starts a new outage."""

    def __init__(self, quiet: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self._quiet = quiet
        self._clock = clock
        self._last: tuple[str, str] | None = None
        self._last_at = -math.inf

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        said = clean((str(exc) or type(exc).__name__) if exc is not None else record.getMessage(), 500)
        key, now = (type(exc).__name__, said), self._clock()
        fresh = key != self._last or now - self._last_at > self._quiet
        self._last, self._last_at = key, now
        if not fresh:
            return False
        record.msg, record.args = "database connection pool cannot reconnect: %s (%s)", (said, record.getMessage())
        record.exc_info = record.exc_text = None
        record.action = "db_pool_failing"
        return True


def setup(fmt: str = "plain", level: str = "INFO") -> None:
    handler = _journal()
    if handler is None:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(JsonFormatter() if fmt == "json" else PlainFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    pool = logging.getLogger("asyncpg.pool")
    for old in [f for f in pool.filters if isinstance(f, PoolOutageFilter)]:
        pool.removeFilter(old)
    pool.addFilter(PoolOutageFilter())
    root.setLevel(level)
    logging.getLogger("asyncio").setLevel(logging.WARNING)
    logging.getLogger("pyroute2").setLevel(logging.WARNING)  # its DEBUG chatter is not ours
