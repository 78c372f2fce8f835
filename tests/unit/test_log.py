from __future__ import annotations

import json
import logging

from agent.log import JournalHandler, JsonFormatter, PlainFormatter


def record(**extra) -> logging.LogRecord:
    rec = logging.LogRecord("agent.executor", logging.WARNING, __file__, 1, "retry in %.1fs", (2.0,), None)
    rec.__dict__.update(extra)
    return rec


FIELDS = {"action": "retried", "device": "r1", "service": "wifi", "msg_id": 7, "request_id": "pay-1"}


def test_json_lines_carry_the_shared_vocabulary():
    doc = json.loads(JsonFormatter().format(record(**FIELDS)))
    assert doc["msg"] == "retry in 2.0s" and doc["level"] == "warning"
    assert {k: doc[k] for k in FIELDS} == FIELDS


def test_plain_lines_lead_with_the_action():
    line = PlainFormatter().format(record(**FIELDS))
    assert "WARNING retried" in line and "device=r1" in line and "msg_id=7" in line


def test_journal_gets_structured_fields():
    sent = []
    JournalHandler(lambda msg, **kw: sent.append((msg, kw))).emit(record(**FIELDS))
    [(msg, fields)] = sent
    assert msg == "retry in 2.0s" and fields["PRIORITY"] == "4"
    assert (fields["DEVICE"], fields["SERVICE"], fields["MSG_ID"], fields["REQUEST_ID"], fields["ACTION"]) == (
        "r1", "wifi", "7", "pay-1", "retried")
