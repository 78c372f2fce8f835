"""Metrics an operator of many sites can alert on: our own prefix, zeros before the first event,
process and Python figures, no `_created` series; alert rules that link their runbook."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from prometheus_client import generate_latest

from agent.runtime.metrics import Live, Metrics

ROOT = Path(__file__).resolve().parents[2]


def scrape(live: Live | None = None) -> str:
    m = Metrics("north", "device_tasks", lambda: live or Live())
    return generate_latest(m.registry).decode()


def samples(text: str) -> list[str]:
    return [line for line in text.splitlines() if line and not line.startswith("#")]


def test_every_series_of_ours_has_the_product_prefix():
    ours = [s for s in samples(scrape()) if not s.startswith(("process_", "python_"))]
    assert ours and all(s.startswith("pgmq_edge_agent_") for s in ours)


def test_no_created_series():
    assert "_created" not in scrape()


def test_process_and_python_collectors_are_on_the_registry():
    text = scrape()
    for name in ("process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds",
                 "python_gc_collections_total", "python_info"):
        assert re.search(rf"^{name}\b", text, re.M), name


def test_outcomes_known_in_advance_start_at_zero():
    text = scrape()
    for outcome in ("dead_lettered", "verified", "expired", "superseded"):
        for driver in ("sim", "http", "none"):
            assert f'pgmq_edge_agent_commands_total{{driver="{driver}",outcome="{outcome}"}} 0.0' in text
    for outcome in ("retried", "parked", "rerouted"):
        assert f'pgmq_edge_agent_command_attempts_total{{driver="sim",outcome="{outcome}"}} 0.0' in text
    assert 'pgmq_edge_agent_reconcile_services_total{result="failed"} 0.0' in text
    assert 'pgmq_edge_agent_wakeups_total{source="notify"} 0.0' in text
    assert "pgmq_edge_agent_report_failures_total 0.0" in text


def test_commands_total_counts_each_command_once_by_how_it_ended_and_attempts_apart():
    from datetime import datetime, timezone

    from agent.model.outcome import Delivery, EventRow, Outcome

    m = Metrics("north", "device_tasks", Live)

    def outcome(msg_id: int, *kinds: str, finish: Any = "archive") -> Outcome:
        delivery = Delivery(msg_id, 1, datetime.now(timezone.utc), "{}", None, msg_id)
        return Outcome(delivery, finish, [EventRow(kind, "r1", "wifi", msg_id) for kind in kinds], driver="sim")

    m.committed([outcome(1, "failed", "retried"), outcome(1, "parked", finish="park")], 0)  # two deliveries
    m.committed([outcome(1, finish="park")], 0)  # parked again for the same reason: no event, an attempt all the same
    m.committed([outcome(1, "verified"), outcome(2, "dead_lettered")], 0)
    text = generate_latest(m.registry).decode()
    assert 'pgmq_edge_agent_commands_total{driver="sim",outcome="verified"} 1.0' in text
    assert 'pgmq_edge_agent_commands_total{driver="sim",outcome="dead_lettered"} 1.0' in text
    assert 'pgmq_edge_agent_commands_total{driver="sim",outcome="retried"}' not in text
    assert 'pgmq_edge_agent_command_attempts_total{driver="sim",outcome="retried"} 1.0' in text
    assert 'pgmq_edge_agent_command_attempts_total{driver="sim",outcome="parked"} 2.0' in text


def test_the_leaders_last_retention_pass_is_exported_for_the_alert():
    assert 'pgmq_edge_agent_retention_last_success_timestamp_seconds{site="north"} 1234.5' in \
        scrape(Live(leader=True, pruned_at=1234.5))
    assert "pgmq_edge_agent_retention_last_success_timestamp_seconds{" not in scrape(Live())  # not the leader


def test_site_labels_where_an_operator_of_many_sites_needs_them():
    text = scrape(Live(leader=True, last_heartbeat=1234.5))
    assert 'pgmq_edge_agent_reconcile_leader{site="north"} 1.0' in text
    assert 'pgmq_edge_agent_last_heartbeat_timestamp_seconds{site="north"} 1234.5' in text
    assert 'pgmq_edge_agent_build_info{queue="device_tasks",site="north"' in text


def test_table_figures_from_the_leaders_last_prune_pass():
    text = scrape(Live(tables={"events": (8192, 3600.0), "dlq": (4096, None)}))
    assert 'pgmq_edge_agent_table_size_bytes{table="events"} 8192.0' in text
    assert 'pgmq_edge_agent_table_oldest_row_age_seconds{table="events"} 3600.0' in text
    assert 'pgmq_edge_agent_table_oldest_row_age_seconds{table="dlq"}' not in text  # empty: no age


def test_every_alert_links_its_runbook_section_and_is_tested():
    text = (ROOT / "etc/prometheus/agent-alerts.yml").read_text()
    rules = [{"alert": m[0], "expr": m[1], "annotations": {"runbook_url": m[2]}} for m in re.findall(
        r"- alert: (\w+)\n\s+expr: (.*?)\n\s+(?:for|labels):.*?runbook_url: \"([^\"]+)\"", text, re.S)]
    assert len(rules) == text.count("- alert:") >= 12
    tests = (ROOT / "etc/prometheus/agent-alerts.test.yml").read_text()
    runbook = (ROOT / "docs/operations.md").read_text()
    anchors = {re.sub(r"[^a-z0-9-]", "", h.lower().replace(" ", "-")) for h in re.findall(r"^#+ (.+)$", runbook, re.M)}
    for rule in rules:
        url = rule["annotations"]["runbook_url"]
        assert url.startswith("docs/operations.md#") and url.partition("#")[2] in anchors, rule["alert"]
        assert f"alertname: {rule['alert']}\n" in tests, rule["alert"]
        assert re.search(r"pgmq_edge_agent_|^up\{", rule["expr"]) and not re.search(r"(?<![a-z_])agent_", rule["expr"])


def test_the_guards_held_commands_are_a_gauge_by_site():
    assert "pgmq_edge_agent_guard_held_commands{" not in scrape()  # not sampled yet: no value
    assert 'pgmq_edge_agent_guard_held_commands{site="north"} 1300.0' in scrape(Live(held=1300))


def test_command_latency_is_enqueue_to_verified_by_state_and_priority():
    from datetime import datetime, timedelta, timezone

    from agent.model.outcome import Delivery, EventRow, Outcome

    m = Metrics("north", "device_tasks", Live)
    ten_seconds_ago = datetime.now(timezone.utc) - timedelta(seconds=10)

    def verified(msg_id: int, state: str, prio: str | None = None, kind: str = "verified") -> Outcome:
        d = Delivery(msg_id, 1, ten_seconds_ago, "{}", None, msg_id, priority=prio)
        return Outcome(d, "archive", [EventRow(kind, "r1", "wifi", msg_id, msg_id, desired=state)])

    m.committed([verified(1, "on"), verified(2, "off"), verified(3, "off", "high"), verified(4, "on", kind="expired")],
                0)
    text = generate_latest(m.registry).decode()
    for state, prio, n in (("on", "high", 1), ("off", "normal", 1), ("off", "high", 1), ("on", "normal", 0)):
        assert f'pgmq_edge_agent_command_latency_seconds_count{{priority="{prio}",state="{state}"}} {n}.0' in text
    assert 'pgmq_edge_agent_command_latency_seconds_bucket{le="5.0",priority="high",state="on"} 0.0' in text
    assert 'pgmq_edge_agent_command_latency_seconds_bucket{le="30.0",priority="high",state="on"} 1.0' in text


def test_a_histogram_fed_at_once_is_exposed_as_prometheus_clients_own_would_be():
    import random

    from prometheus_client import CollectorRegistry, Histogram

    from agent.runtime.metrics import Histograms

    buckets = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10)
    ours_r, theirs_r = CollectorRegistry(), CollectorRegistry()
    ours = Histograms("x_seconds", "X.", ("state",), buckets, ours_r)
    theirs = Histogram("x_seconds", "X.", ["state"], buckets=buckets, registry=theirs_r)
    rng = random.Random(7)
    values = [rng.choice((0.0, 0.05, 0.1, 10.0, 11.0)) for _ in range(50)] + [rng.uniform(0, 12) for _ in range(500)]
    ours.observe(values[:300], "on")  # two batches, one series; another series created empty
    ours.observe(values[300:], "on")
    ours.series("off")
    for v in values:
        theirs.labels("on").observe(v)
    theirs.labels("off")

    def lines(r: CollectorRegistry) -> list[str]:  # the sums' last digits may differ by the order of addition
        return [line if "_sum{" not in line else line[:30] for line in generate_latest(r).decode().splitlines()]

    assert lines(ours_r) == lines(theirs_r)
    assert 'x_seconds_bucket{le="0.05",state="on"}' in generate_latest(ours_r).decode()
    assert f'x_seconds_count{{state="on"}} {len(values)}.0' in generate_latest(ours_r).decode()
