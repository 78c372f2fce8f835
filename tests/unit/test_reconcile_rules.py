"""Pure rules of reconciliation: the schedule, when drift is confirmed, how findings are counted."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from agent.errors import ConfigError
from agent.reconcile.judge import Finding, needs_repair, summary
from agent.reconcile.schedule import parse_schedule
from agent.settings import load_settings

T0 = datetime(2026, 11, 23, 10, 3, 7, tzinfo=timezone.utc)


def test_cron_and_interval_schedules():
    assert parse_schedule("*/5 * * * *").next_after(T0) == T0.replace(minute=5, second=0)
    assert (parse_schedule("90").next_after(T0) - T0).total_seconds() == 90
    assert parse_schedule("off").next_after(T0) is None


@pytest.mark.parametrize("bad", ["*/5 * * *", "61 * * * *", "0.5", "often"])
def test_a_bad_schedule_is_refused_at_start_naming_the_setting(bad):
    with pytest.raises(ConfigError, match="AGENT_RECONCILE_SCHEDULE"):
        load_settings(None, database_url="postgresql://x/y", reconcile_schedule=bad)


def test_drift_needs_as_many_differing_readings_as_asked():
    assert needs_repair("on", ["off"], confirm=1)
    assert not needs_repair("on", ["off"], confirm=2)
    assert needs_repair("on", ["off", "off"], confirm=2)
    assert not needs_repair("on", ["off", "on"], confirm=1)


def test_summary_counts_drift_repairs_and_unreadable_apart():
    s = summary([Finding("a", "on", "on", "in_sync"), Finding("b", "on", "on", "repaired"),
                 Finding("c", "off", "on", "drift"), Finding("d", "on", None, "unreadable", "timeout"),
                 Finding("e", "on", "off", "failed", "HTTP 500")])
    assert (s["checked"], s["in_sync"], s["drifted"], s["repaired"], s["unreadable"], s["failed"]) == (5, 1, 3, 1, 1, 1)
    assert [i["service"] for i in s["items"]] == ["a", "b", "c", "d", "e"]


def test_a_reconcile_waits_for_an_unreachable_device_until_the_bound_by_the_databases_clock():
    from agent.model.outcome import Delivery
    from agent.reconcile.worker import wait_over

    fed = Delivery(1, 3, T0, "{}", None, 1, bounces=2, skew=-30.0)  # our clock is 30 s ahead of the database's
    now = T0.timestamp() + 30 + 119
    assert wait_over(fed, "peer down", 120, now) is None  # 119 s by the database's clock: parked again
    assert wait_over(fed, "peer down", 120, now + 1) == "unreachable for 120s: peer down"


def _gated(reason: str, waited_s: float, paused: str | None = None):  # type: ignore[no-untyped-def]
    """What the worker does with a reconcile message the gate keeps from its device (it touches no
    database on that path), fed `waited_s` seconds ago with nine parks behind it."""
    import asyncio
    from datetime import timedelta

    from agent.executor.policy import RetryPolicy
    from agent.model.device import Device
    from agent.model.outcome import Delivery
    from agent.reconcile.messages import ReconcileMessages
    from agent.reconcile.request import SyncRequest
    from agent.reconcile.worker import ReconcileTuning, SyncWorker

    now = datetime.now(timezone.utc)
    d = Delivery(7, 10, now - timedelta(seconds=waited_s), "{}", None, 7, bounces=9)
    worker = SyncWorker(None, None, None, None, lambda _dev: reason,  # type: ignore[arg-type]
                        lambda: (RetryPolicy(3, 1, 5), 10.0), ReconcileTuning(unreachable_wait=120))
    work = ReconcileMessages(worker).item(d, SyncRequest(run=1, device="r1"), Device("r1", "sim", paused=paused))
    return asyncio.run(worker.handle(work))


def test_an_unreachable_devices_reconcile_is_parked_no_longer_than_its_wait_has_left():
    out = _gated("peer down", 110)
    assert out.finish == "park" and out.retry_delay <= 10.5  # not the 30 to 60 s its ninth park would wait
    out = _gated("peer down", 121)
    assert out.finish == "archive" and out.sync["skipped"].startswith("unreachable for 12")
    assert out.sync["unreadable"] == 1 and out.sync["items"][0]["error"] == f"not checked: {out.sync['skipped']}"


def test_a_paused_devices_reconcile_is_reported_not_checked_at_once():
    out = _gated("paused: firmware upgrade", 0, paused="firmware upgrade")
    assert out.finish == "archive" and out.sync["skipped"] == "paused: firmware upgrade"
