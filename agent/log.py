"""One logging vocabulary: every record carries `action` and, where they apply, device, service,
msg_id, request_id and outcome. Plain text or JSON lines on stdout (AGENT_LOG_FORMAT)."""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone

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
    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.fromtimestamp(record.created, timezone.utc).strftime("%H:%M:%S.%f")[:-3]
        fields = " ".join(f"{k}={v}" for k, v in _extra(record).items() if k != "action")
        action = getattr(record, "action", "-")
        line = f"{ts} {record.levelname:<7} {action:<14} {record.getMessage()}"
        if fields:
            line += f"  [{fields}]"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def setup(fmt: str = "plain", level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter() if fmt == "json" else PlainFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("asyncio").setLevel(logging.WARNING)
