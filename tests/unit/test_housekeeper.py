"""The housekeeper decides readiness, the status line, what the metrics read and when systemd's watchdog
is fed from the parts' own figures alone: built here from plain figures, without an Agent or Postgres."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from datetime import datetime, timezone

from prometheus_client import generate_latest

from agent.db.session import SessionFigures
from agent.executor.budgets import BudgetFigures
from agent.reconcile.reconciler import ReconcilerFigures
from agent.runtime.metrics import Metrics
from agent.vpn.guard import Reach, VpnFigures
from agent.vpn.health import PeerVerdict
from tests.support.house import Parts, Told, housekeeper, live
from tests.support.wait import until

READY = "ready: 0 in flight; queue ?; 0 done, 0 retried, 0 dead-lettered"


def test_an_agent_is_ready_once_started_with_its_database_and_session_connection_up():
    house = housekeeper(Parts())
    assert not house.ready() and house.status_line().startswith("starting: ")
    house.started()
    assert house.ready() and house.status_line() == READY


def test_it_tells_systemd_ready_and_stopping_with_the_status_line():
    told = Told()
    house = housekeeper(Parts(), told)
    house.started()
    house.stopping()
    assert told.sent == [("READY=1", f"STATUS={READY}"),
                         ("STOPPING=1", "STATUS=stopping: 0 in flight; queue ?; 0 done, 0 retried, 0 dead-lettered")]
    assert not house.ready()


def test_a_failed_read_degrades_it_and_says_why():
    parts = Parts()
    house = housekeeper(parts)
    house.started()
    parts.consumer_now(read_error="connection refused", inflight=3)
    assert not house.ready()
    assert house.status_line() == ("degraded: database unreachable, reconnecting (connection refused); 3 in flight; "
                                   "queue ?; 0 done, 0 retried, 0 dead-lettered")
    scraped = house.live()
    assert not scraped.database_up and not scraped.ready and scraped.inflight == 3


async def test_a_failed_statement_of_its_own_degrades_it_too():
    house = housekeeper(Parts())
    house.started()
    await house.sample_queue()  # the pool refuses
    assert house.figures().database_error == "connection refused" and not house.ready()


def test_a_session_connection_down_degrades_it_and_says_why_while_it_reconnects():
    parts = Parts(session=SessionFigures(connected=False, error="server closed the connection", reconnects=2))
    house = housekeeper(parts)
    house.started()
    assert not house.ready()
    assert house.status_line().startswith("degraded: session connection (LISTEN, leadership) down, reconnecting "
                                          "(server closed the connection); ")
    assert house.live().reconnects == 2 and not house.live().database_up


def test_a_tunnel_problem_degrades_it_only_where_the_tunnel_is_required():
    parts = Parts(vpn=VpnFigures(required=False, error="wg0 is down", peers=(), reach={}))
    house = housekeeper(parts)
    house.started()
    assert house.ready()
    parts.vpn = replace(parts.vpn, required=True)
    assert not house.ready() and house.status_line().startswith("degraded: VPN: wg0 is down; ")


def test_the_status_shows_unreachable_devices_peers_and_budgets_from_their_parts():
    peer = PeerVerdict("abcdefgh", up=False, reason="last handshake 200s ago", handshake_age=200.04,
                       endpoint="192.0.2.1:51820", rx_bytes=10, tx_bytes=20)
    opened = {"device": "r2", "max_rate": None, "rate_waits": 0, "rate_wait_s": 0.0, "breaker": "open",
              "timeouts": 5, "trips": 1, "retry_after": "2026-12-31T23:59:30.000Z"}
    parts = Parts(vpn=VpnFigures(True, None, (peer,), {"r1": Reach(False, "peer_down", "abcdefgh", 1000.0),
                                                       "r3": Reach(True, "ok", "abcdefgh", 900.0)}),
                  budgets=BudgetFigures((opened,), {"r2": (True, 1)}, {}), parked=2)
    house = housekeeper(parts)
    house.started()
    f = house.figures()
    assert f.unreachable == [{"device": "r1", "reason": "peer_down", "since": 1000.0}]
    assert f.peers == [{"peer": "abcdefgh", "state": "down", "reason": "last handshake 200s ago",
                        "handshake_age_s": 200.0, "endpoint": "192.0.2.1:51820", "rx_bytes": 10, "tx_bytes": 20}]
    assert f.budgets == [opened] and f.vpn_required
    assert house.status_line() == ("ready: 0 in flight; queue ?; 2 parked; 1 breaker open; "
                                   "0 done, 0 retried, 0 dead-lettered")


def test_the_next_reconcile_is_told_only_while_leading():
    due = datetime(2026, 12, 31, 23, 0, tzinfo=timezone.utc)
    parts = Parts(reconciler=ReconcilerFigures(next_run=due, tables={}, pruned_at=None))
    house = housekeeper(parts)
    assert house.figures().next_reconcile is None and not house.figures().leader
    parts.leading = True
    assert house.figures().next_reconcile == "2026-12-31T23:00:00.000Z" and house.figures().leader


def test_the_metrics_read_the_parts_figures_and_readiness_at_scrape_time():
    parts = Parts(budgets=BudgetFigures((), {"r2": (True, 3)}, {"r1": (4, 0.5)}), leading=True,
                  reconciler=ReconcilerFigures(None, {"events": (8192, 60.0)}, 1234.5))
    parts.consumer_now(wakeups={"notify": 5})
    house = housekeeper(parts)
    house.started()
    metrics = Metrics("north", "device_tasks", house.live)

    def scrape() -> str:
        return generate_latest(metrics.registry).decode()

    text = scrape()
    assert "pgmq_edge_agent_ready 1.0" in text
    assert 'pgmq_edge_agent_wakeups_total{source="notify"} 5.0' in text
    assert 'pgmq_edge_agent_device_breaker_open{device="r2"} 1.0' in text
    assert 'pgmq_edge_agent_device_breaker_trips_total{device="r2"} 3.0' in text
    assert 'pgmq_edge_agent_device_rate_limit_waits_total{device="r1"} 4.0' in text
    assert 'pgmq_edge_agent_reconcile_leader{site="north"} 1.0' in text
    assert 'pgmq_edge_agent_table_size_bytes{table="events"} 8192.0' in text
    parts.consumer_now(read_error="connection refused")
    assert "pgmq_edge_agent_ready 0.0" in scrape()  # not the readiness of the last queue sample


async def test_the_watchdog_is_fed_while_idle_withheld_while_work_stalls_and_fed_again_once_it_moves(caplog):
    told = Told(watchdog_interval=0.01)
    parts = Parts()
    house = housekeeper(parts, told, live(watchdog_stall=60.0))
    task = asyncio.create_task(house.watch())
    try:
        await until(lambda: told.pings >= 2, timeout=5, what="pings while idle")
        parts.consumer_now(work_waits=True, last_progress=time.monotonic() - 120, inflight=1)
        await until(lambda: "watchdog not fed" in caplog.text, timeout=5, what="the stall logged")
        withheld = told.pings
        await until(lambda: caplog.text.count("watchdog not fed") >= 3, timeout=5, what="still stalled")
        assert told.pings == withheld
        parts.consumer_now(last_progress=time.monotonic())  # an outcome was committed
        await until(lambda: told.pings > withheld, timeout=5, what="pings again")
    finally:
        task.cancel()
