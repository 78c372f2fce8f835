from __future__ import annotations

import json
import logging
import os
import re
import sys

import pytest

from agent import log as agent_log
from agent.log import JsonFormatter, PlainFormatter, PoolOutageFilter, stream_is_journal
from agent.reconcile.reconciler import run_summary


def record(exc: BaseException | None = None, **extra) -> logging.LogRecord:
    info = (type(exc), exc, exc.__traceback__) if exc is not None else None
    rec = logging.LogRecord("agent.executor", logging.WARNING, __file__, 1, "retry in %.1fs", (2.0,), info)
    rec.__dict__.update(extra)
    return rec


FIELDS = {"action": "retried", "device": "r1", "service": "wifi", "msg_id": 7, "request_id": "pay-1"}


def test_json_lines_carry_the_shared_vocabulary():
    doc = json.loads(JsonFormatter().format(record(**FIELDS)))
    assert doc["msg"] == "retry in 2.0s" and doc["level"] == "warning"
    assert {k: doc[k] for k in FIELDS} == FIELDS
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", doc["ts"])


def test_plain_lines_lead_with_date_zone_and_action():
    line = PlainFormatter().format(record(**FIELDS))
    assert "WARNING retried" in line and "device=r1" in line and "msg_id=7" in line
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z ", line)  # a line read next week is unambiguous


@pytest.fixture
def journal_stream(tmp_path, monkeypatch):
    """stderr is a file whose device:inode JOURNAL_STREAM names, as systemd sets it up."""
    f = open(tmp_path / "stream", "w")
    st = os.fstat(f.fileno())
    monkeypatch.setattr(sys, "stderr", f)
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    yield f
    f.close()
    logging.getLogger().handlers[:] = []


def test_journal_stream_is_trusted_only_when_stderr_is_that_stream(journal_stream, tmp_path):
    assert stream_is_journal(os.environ["JOURNAL_STREAM"], journal_stream)
    other = open(tmp_path / "other", "w")
    assert not stream_is_journal(os.environ["JOURNAL_STREAM"], other)  # inherited the variable, writes elsewhere
    other.close()
    assert not stream_is_journal("garbage", journal_stream) and not stream_is_journal(None, journal_stream)


def test_under_journald_records_go_to_systemds_journal_handler_with_fields_and_traceback(journal_stream, monkeypatch):
    journal = pytest.importorskip("systemd.journal")
    monkeypatch.setattr(sys, "stderr", journal_stream)
    agent_log.setup("plain", "INFO")
    [handler] = logging.getLogger().handlers
    assert isinstance(handler, journal.JournalHandler)
    sent = []
    handler.send = lambda MESSAGE, **kw: sent.append((MESSAGE, kw))  # type: ignore[attr-defined]
    try:
        raise ValueError("boom")
    except ValueError as exc:
        logging.getLogger("agent.executor").warning("retry in %.1fs", 2.0, exc_info=exc, extra=FIELDS)
    [(msg, fields)] = sent
    assert msg.startswith("retry in 2.0s") and "Traceback" in msg and "ValueError: boom" in msg
    assert fields["PRIORITY"] == "4" and fields["SYSLOG_IDENTIFIER"] == "agentd"
    # journald keeps only upper-case field names: ours must be sent as such, not as `device=`
    assert (fields["DEVICE"], fields["SERVICE"], fields["MSG_ID"], fields["REQUEST_ID"], fields["ACTION"]) == (
        "r1", "wifi", "7", "pay-1", "retried")
    assert fields["CODE_FILE"] == __file__ and fields["CODE_FUNC"].startswith("test_under_journald")


def test_output_never_vanishes_when_stderr_is_not_the_journal(journal_stream, monkeypatch, tmp_path):
    elsewhere = open(tmp_path / "elsewhere", "w")
    monkeypatch.setattr(sys, "stderr", elsewhere)  # inherited JOURNAL_STREAM, but stderr was redirected
    agent_log.setup("plain", "INFO")
    [handler] = logging.getLogger().handlers
    assert isinstance(handler, logging.StreamHandler) and handler.stream is sys.stdout


def test_a_pool_outage_is_one_line_per_state_change():
    now = [0.0]
    f = PoolOutageFilter(quiet=60, clock=lambda: now[0])

    def fails(exc: BaseException) -> logging.LogRecord | None:
        rec = logging.LogRecord("asyncpg.pool", logging.WARNING, __file__, 1, "Failed to restore the pool "
                                "connection floor; retrying", (), (type(exc), exc, None))
        now[0] += 2
        return rec if f.filter(rec) else None

    first = fails(ConnectionRefusedError(111, "Connect call failed"))
    assert first is not None and first.exc_info is None and first.action == "db_pool_failing"  # type: ignore[attr-defined]
    assert "Connect call failed" in first.getMessage()
    assert [fails(ConnectionRefusedError(111, "Connect call failed")) for _ in range(100)] == [None] * 100
    assert fails(FileNotFoundError(2, "No such file or directory")) is not None  # the error changed
    now[0] += 120  # it came back, then failed again later: a new outage
    assert fails(FileNotFoundError(2, "No such file or directory")) is not None


def test_setup_installs_the_pool_filter_once():
    agent_log.setup("plain", "INFO")
    agent_log.setup("plain", "INFO")
    pool = logging.getLogger("asyncpg.pool")
    assert sum(isinstance(f, PoolOutageFilter) for f in pool.filters) == 1
    logging.getLogger().handlers[:] = []


def test_a_run_summary_is_info_when_in_sync_and_warning_when_not():
    run = {"id": 7, "kind": "scheduled", "dry_run": False, "device": None, "service": None, "devices": 500,
           "checked": 500, "in_sync": 500, "drifted": 0, "repaired": 0, "unreadable": 0, "failed": 0, "took": 12.3}
    level, text = run_summary(run)
    assert level == logging.INFO and text.startswith("reconcile run 7 (scheduled, whole site) finished in 12.3s")
    assert "500 device(s)" in text
    level, text = run_summary({**run, "in_sync": 498, "drifted": 2, "repaired": 2, "device": "r1"})
    assert level == logging.WARNING and "device r1" in text and "2 drifted, 2 repaired" in text
