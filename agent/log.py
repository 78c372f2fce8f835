"""One logging vocabulary: every record carries `action` and, where they apply, device, service,
msg_id, request_id and outcome. Plain text or JSON lines on stdout (AGENT_LOG_FORMAT)."""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import datetime, timezone

from agent.text import clean

FIELDS = ("action", "device", "service", "msg_id", "request_id", "attempt", "duration_ms", "changed",
          "observed", "error", "site", "queue", "source", "msg_ids", "channels", "batch", "migration")


def _extra(record: logging.LogRecord) -> dict[str, object]:
    return {k: getattr(record, k) for k in FIELDS if getattr(record, k, None) is not None}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {"ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
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
        ts = datetime.fromtimestamp(record.created, timezone.utc).strftime("%H:%M:%S.%f")[:-3]
        fields = " ".join(f"{k}={clean(v, 1000)}" for k, v in _extra(record).items() if k != "action")
        action = clean(getattr(record, "action", "-"), 40)
        line = f"{ts} {record.levelname:<7} {action:<14} {clean(record.getMessage(), 4000)}"
        if fields:
            line += f"  [{fields}]"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


_PRIORITY = {"DEBUG": 7, "INFO": 6, "WARNING": 4, "ERROR": 3, "CRITICAL": 2}


class JournalHandler(logging.Handler):
    """journald with structured fields: DEVICE=, SERVICE=, REQUEST_ID=, MSG_ID=, ACTION=, ..."""

    def __init__(self, send) -> None:  # type: ignore[no-untyped-def]
        super().__init__()
        self._send = send

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields = {k.upper(): str(v).replace("\x00", "\\0") for k, v in _extra(record).items()}
            self._send(record.getMessage().replace("\x00", "\\0"), PRIORITY=str(_PRIORITY.get(record.levelname, 6)),
                       LOGGER=record.name, SYSLOG_IDENTIFIER="agentd", **fields)
        except Exception:
            self.handleError(record)


def _journal() -> logging.Handler | None:
    """The journal when systemd started us (JOURNAL_STREAM is set) and systemd-python is installed."""
    if not os.environ.get("JOURNAL_STREAM"):
        return None
    try:
        from systemd import journal
    except ImportError:
        return None
    return JournalHandler(journal.send)


def setup(fmt: str = "plain", level: str = "INFO") -> None:
    handler = _journal()
    if handler is None:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(JsonFormatter() if fmt == "json" else PlainFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("asyncio").setLevel(logging.WARNING)
    logging.getLogger("pyroute2").setLevel(logging.WARNING)  # its DEBUG chatter is not ours
