"""Prometheus metrics: base units, `_total` counters, bounded labels (device ids yes; customers,
addresses and request ids never). One registry per Agent, served at /metrics."""

from __future__ import annotations

import bisect
import collections
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Info,
    disable_created_metrics,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

from agent import __version__
from agent.drivers.registry import available as available_drivers
from agent.model import priority
from agent.model.outcome import Delivery, Outcome

disable_created_metrics()  # no `_created` series: they double the series count and no rule uses them
PREFIX = "pgmq_edge_agent_"  # not `agent_`, which Grafana Agent's own metrics use
P = PREFIX

_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 900, 3600)
_WAIT_BUCKETS = (0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600)

# event kinds that end or move a delivery, as counted in pgmq_edge_agent_commands_total{outcome}
# commands_total counts each command once, by how it ended; command_attempts_total the deliveries
# that did not end it (tried again later, parked for an unreachable device, moved to its site's queue).
_OUTCOME_EVENTS = {"verified", "refreshed", "superseded", "duplicate", "expired", "dead_lettered"}
# events of attempts (parks are counted by finish: one event per reason)
_ATTEMPT_EVENTS = {"retried", "rerouted", "held"}
_ATTEMPTS = ("held", "parked", "rerouted", "retried")
_RECONCILE_RESULTS = ("in_sync", "drifted", "repaired", "unreadable", "failed", "parked")
_WAKE_SOURCES = ("start", "notify", "poll", "connect", "unpark", "catchup")


@dataclass
class Live:
    """Figures read from the components at scrape time (they keep plain counters, not metrics): the
    housekeeper's `live()` gathers them from each part's own figures."""

    wakeups: dict[str, int] = field(default_factory=dict)
    reconnects: int = 0
    database_up: bool = False  # the session connection is up and the last pooled statement worked
    inflight: int = 0
    parked: int = 0
    queues: dict[str, tuple[int, float | None]] = field(default_factory=dict)  # queue -> (depth, oldest age)
    reachable: dict[str, bool] = field(default_factory=dict)                  # device -> reachable
    peers: dict[str, tuple[float | None, int, int, bool]] = field(default_factory=dict)  # age, rx, tx, up
    leader: bool = False
    last_heartbeat: float | None = None  # unix time of the last heartbeat row written
    pruned_at: float | None = None       # unix time of the leader's last successful retention pass
    tables: dict[str, tuple[int, float | None]] = field(default_factory=dict)  # table -> bytes, oldest row age
    breakers: dict[str, tuple[bool, int]] = field(default_factory=dict)    # device -> (open, trips)
    rate_waits: dict[str, tuple[int, float]] = field(default_factory=dict)  # device -> (waits, seconds waited)
    held: int | None = None              # commands of the site's queue held by the guard (sampled)
    ready: bool = False                  # ready to work (agent.runtime.snapshot.healthy), at scrape time


class _LiveCollector:
    def __init__(self, read: Callable[[], Live], site: str) -> None:
        self._read = read
        self._site = site

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        live = self._read()
        wake = CounterMetricFamily(P + "wakeups", "Consumer wake-ups by source.", labels=["source"])
        for source, n in sorted((dict.fromkeys(_WAKE_SOURCES, 0) | live.wakeups).items()):
            wake.add_metric([source], n)
        yield wake
        yield CounterMetricFamily(P + "listener_reconnects", "Session connection (LISTEN, leadership) lost "
                                  "or failed to connect, each time.", value=live.reconnects)
        yield GaugeMetricFamily(P + "database_up", "1 while the session connection is up and the last pooled "
                                "statement worked; 0 while the agent is reconnecting.", value=int(live.database_up))
        yield GaugeMetricFamily(P + "ready", "1 when the agent is ready to work.", value=int(live.ready))
        leader = GaugeMetricFamily(P + "reconcile_leader",
                                   "1 while this agent leads its site's reconciliation.", labels=["site"])
        leader.add_metric([self._site], int(live.leader))
        yield leader
        beat = GaugeMetricFamily(P + "last_heartbeat_timestamp_seconds",
                                 "When this agent last wrote its heartbeat row to the database (unix time).",
                                 labels=["site"])
        if live.last_heartbeat is not None:
            beat.add_metric([self._site], live.last_heartbeat)
        yield beat
        pruned = GaugeMetricFamily(P + "retention_last_success_timestamp_seconds",
                                   "When the site's leader last completed a retention pass (unix time; only the "
                                   "leader exports it).", labels=["site"])
        if live.pruned_at is not None:
            pruned.add_metric([self._site], live.pruned_at)
        yield pruned
        yield GaugeMetricFamily(P + "inflight_messages", "Messages read and not yet settled.", value=live.inflight)
        yield GaugeMetricFamily(P + "parked_messages", "Messages waiting for their device to be reachable.",
                                value=live.parked)
        depth = GaugeMetricFamily(P + "queue_messages", "Messages in the queue (sampled, capped).",
                                  labels=["queue"])
        oldest = GaugeMetricFamily(P + "queue_oldest_message_age_seconds", "Age of the oldest message.",
                                   labels=["queue"])
        for queue, (n, age) in sorted(live.queues.items()):
            depth.add_metric([queue], n)
            oldest.add_metric([queue], age or 0.0)
        yield depth
        yield oldest
        held = GaugeMetricFamily(P + "guard_held_commands", "Commands of the site's queue held by the guard against "
                                 "mass suspension, waiting for `agentctl guard release` or `discard` (sampled).",
                                 labels=["site"])
        if live.held is not None:
            held.add_metric([self._site], live.held)
        yield held
        reach = GaugeMetricFamily(P + "device_reachable", "1 if the device is reachable.", labels=["device"])
        for device, ok in sorted(live.reachable.items()):
            reach.add_metric([device], 1.0 if ok else 0.0)
        yield reach
        yield from _peer_families(live)
        yield from _table_families(live)
        yield from _budget_families(live)


def _budget_families(live: Live) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
    """The device budget (agent/executor/budgets.py): breakers of devices that ever timed out, and
    the pacing of devices with a max_rate."""
    opened = GaugeMetricFamily(P + "device_breaker_open", "1 while the device's breaker is open (too many "
                               "timeouts in a row: its work parks until a probe answers).", labels=["device"])
    trips = CounterMetricFamily(P + "device_breaker_trips", "Times the device's breaker opened (trips and "
                                "failed probes).", labels=["device"])
    for device, (is_open, n) in sorted(live.breakers.items()):
        opened.add_metric([device], 1.0 if is_open else 0.0)
        trips.add_metric([device], n)
    waits = CounterMetricFamily(P + "device_rate_limit_waits", "Device calls that waited for the device's "
                                "max_rate.", labels=["device"])
    waited = CounterMetricFamily(P + "device_rate_limit_wait_seconds", "Time device calls waited for the "
                                 "device's max_rate.", labels=["device"])
    for device, (n, seconds) in sorted(live.rate_waits.items()):
        waits.add_metric([device], n)
        waited.add_metric([device], seconds)
    yield from (opened, trips, waits, waited)


def _table_families(live: Live) -> Iterator[GaugeMetricFamily]:
    """Growing tables, as the site's leader saw them after its last prune pass (only it exports them)."""
    size = GaugeMetricFamily(P + "table_size_bytes", "Size on disk of a growing table (indexes included).",
                             labels=["table"])
    oldest = GaugeMetricFamily(P + "table_oldest_row_age_seconds", "Age of the oldest row of a growing table.",
                               labels=["table"])
    for table, (nbytes, age) in sorted(live.tables.items()):
        size.add_metric([table], nbytes)
        if age is not None:
            oldest.add_metric([table], age)
    yield from (size, oldest)


def _peer_families(live: Live) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
    age = GaugeMetricFamily(P + "wireguard_peer_handshake_age_seconds", "Seconds since the latest handshake.",
                            labels=["peer"])
    up = GaugeMetricFamily(P + "wireguard_peer_up", "1 if the peer's session is judged alive.", labels=["peer"])
    rx = CounterMetricFamily(P + "wireguard_peer_receive_bytes", "Bytes received from the peer.", labels=["peer"])
    tx = CounterMetricFamily(P + "wireguard_peer_transmit_bytes", "Bytes sent to the peer.", labels=["peer"])
    for peer, (handshake_age, rx_bytes, tx_bytes, alive) in sorted(live.peers.items()):
        if handshake_age is not None:
            age.add_metric([peer], handshake_age)
        up.add_metric([peer], 1.0 if alive else 0.0)
        rx.add_metric([peer], rx_bytes)
        tx.add_metric([peer], tx_bytes)
    yield from (age, up, rx, tx)


class Histograms:
    """A histogram with labels, fed many observations at once (a report's worth, a read's): a count
    per bucket and a sum per series, exposed as prometheus_client's Histogram exposes them.
    prometheus_client's takes two locks and scans its buckets for each value, a visible share of the
    agent's CPU at month-end; the agent observes from its one event loop, and a scrape copies."""

    def __init__(self, name: str, doc: str, labelnames: tuple[str, ...], buckets: tuple[float, ...],
                 registry: CollectorRegistry) -> None:
        self._name, self._doc, self._labelnames = name, doc, labelnames
        self._bounds = [float(b) for b in buckets]
        self._les = [floatToGoString(b) for b in self._bounds] + ["+Inf"]
        self._series: dict[tuple[str, ...], tuple[list[int], list[float]]] = {}
        registry.register(self)  # type: ignore[arg-type]

    def series(self, *labels: str) -> tuple[list[int], list[float]]:
        """The counts per bucket (not cumulative) and the sum of one series, created at 0 when new."""
        found = self._series.get(labels)
        if found is None:
            if len(labels) != len(self._labelnames):
                raise ValueError(f"{self._name}: {len(self._labelnames)} label values expected")
            found = self._series[labels] = ([0] * (len(self._bounds) + 1), [0.0])
        return found

    def observe(self, values: Iterable[float], *labels: str) -> None:
        """Each value in the first bucket whose bound it does not exceed (a negative one counts as 0)."""
        counts, total = self.series(*labels)
        bounds = self._bounds
        for v in values:
            v = max(0.0, v)
            counts[bisect.bisect_left(bounds, v)] += 1
            total[0] += v

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(self._name, self._doc, labels=list(self._labelnames))
        for labels, (counts, total) in list(self._series.items()):  # in the order created, as prometheus_client
            cumulative, buckets = 0, []
            for le, n in zip(self._les, list(counts)):
                cumulative += n
                buckets.append((le, cumulative))
            family.add_metric(list(labels), buckets, total[0])
        yield family


class Metrics:
    def __init__(self, site: str, queue: str, live: Callable[[], Live]) -> None:
        r = self.registry = CollectorRegistry()
        r.register(_LiveCollector(live, site))  # type: ignore[arg-type]
        _identify(r, site, queue)
        self.commands = Counter(P + "commands_total", "Commands by how they ended (each command once) and driver.",
                                ["outcome", "driver"], registry=r)
        self.attempts = Counter(P + "command_attempts_total", "Deliveries that did not end their command: "
                                "retried, parked (device unreachable), rerouted (moved to its site's queue), held "
                                "(by the guard against mass suspension).",
                                ["outcome", "driver"], registry=r)
        self.duration = Histograms(P + "command_duration_seconds", "Device work per delivery (read, apply, verify).",
                                   ("driver",), _DURATION_BUCKETS, r)
        self.queue_wait = Histograms(P + "command_queue_wait_seconds", "Enqueue to first read by this agent.",
                                     (), _WAIT_BUCKETS, r)
        self.queue_wait.series()
        self.latency = Histograms(P + "command_latency_seconds", "Enqueue to verified, per verified command: what a "
                                  "customer waits for (state: on/off/...; priority: high/normal).",
                                  ("state", "priority"), _LATENCY_BUCKETS, r)
        for state in ("on", "off"):
            for prio in priority.PRIORITIES:
                self.latency.series(state, prio)
        self.lease_lost = Counter(P + "lease_lost_total", "Messages another reader took before we settled them.",
                                  registry=r)
        self.report_failures = Counter(P + "report_failures_total", "Report transactions that failed.",
                                       registry=r)
        self.reconcile = Counter(P + "reconcile_services_total", "Services checked by reconciliation, by what "
                                 "was found: in_sync, drifted, repaired, unreadable, failed (repair failed); parked "
                                 "counts devices put off by the VPN gate.", ["result"], registry=r)
        self.reconcile_devices = Counter(P + "reconcile_devices_total", "Devices reconciled.", registry=r)
        self.policy_missing = Counter(P + "reconcile_policy_missing_total", "Suspension policies found blocking "
                                      "nobody by reconciliation (an address list no enabled firewall rule uses, "
                                      "...), one per device and problem each run.", registry=r)
        for outcome in sorted(_OUTCOME_EVENTS):  # known in advance: 0 from the start, so increase() sees the first
            for driver in sorted({*available_drivers(), "none"}):
                self.commands.labels(outcome, driver)
        for outcome in _ATTEMPTS:
            for driver in sorted({*available_drivers(), "none"}):
                self.attempts.labels(outcome, driver)
        for result in _RECONCILE_RESULTS:
            self.reconcile.labels(result)
        self.up_since = Gauge(P + "start_time_seconds", "When this agent started (unix time).", registry=r)
        self.up_since.set(time.time())
        self.last_success = Gauge(P + "last_success_timestamp_seconds", "Last verified command (unix time).",
                                  registry=r)

    def committed(self, outcomes: Iterable[Outcome], lost: int) -> None:
        counts: collections.Counter[tuple[str, str]] = collections.Counter()
        attempts: collections.Counter[tuple[str, str]] = collections.Counter()
        durations: dict[tuple[str, ...], list[float]] = collections.defaultdict(list)
        latencies: dict[tuple[str, ...], list[float]] = collections.defaultdict(list)
        verified, now = False, time.time()
        for o in outcomes:
            driver = o.driver or "none"
            if o.reconcile:  # counted apart from commands
                self._reconciled(o)
                continue
            if o.finish == "park" and not o.bounce:
                attempts[("parked", driver)] += 1
            for ev in o.events:
                if ev.kind in _OUTCOME_EVENTS:
                    counts[(ev.kind, driver)] += 1
                    verified = verified or ev.kind == "verified"
                    if ev.kind == "verified" and ev.desired in ("on", "off"):  # known words: no label from a message
                        d = o.delivery
                        latencies[(ev.desired, priority.of(d.priority, ev.desired))].append(
                            now + d.skew - d.enqueued_at.timestamp())  # enqueue (the database's clock) to now
                elif ev.kind in _ATTEMPT_EVENTS:
                    attempts[(ev.kind, driver)] += 1
                if ev.duration_ms is not None and ev.kind in ("verified", "refreshed", "failed"):
                    durations[(driver,)].append(ev.duration_ms / 1000)
        for labels, values in durations.items():
            self.duration.observe(values, *labels)
        for labels, values in latencies.items():
            self.latency.observe(values, *labels)
        for (kind, driver), n in counts.items():
            self.commands.labels(kind, driver).inc(n)
        for (kind, driver), n in attempts.items():
            self.attempts.labels(kind, driver).inc(n)
        if verified:
            self.last_success.set(time.time())
        if lost:
            self.lease_lost.inc(lost)

    def _reconciled(self, o: Outcome) -> None:
        if missing := sum(ev.kind == "policy_missing" for ev in o.events):
            self.policy_missing.inc(missing)
        if o.sync is not None:
            for result in ("in_sync", "drifted", "repaired", "unreadable", "failed"):
                if n := o.sync.get(result):
                    self.reconcile.labels(result).inc(n)
            self.reconcile_devices.inc()
        elif o.finish == "park" and not o.bounce:
            self.reconcile.labels("parked").inc()

    def read(self, deliveries: Iterable[Delivery]) -> None:
        now = time.time()
        self.queue_wait.observe([now - d.enqueued_at.timestamp() for d in deliveries if d.read_ct == 1])


def starting_registry(site: str, queue: str) -> CollectorRegistry:
    """What /metrics shows while the agent starts (waiting for the database or the tunnel): not ready,
    which agent this is, and its process. Prometheus then sees the agent *not ready*
    (PgmqEdgeAgentNotReady; /status says why) instead of a scrape without any series, which no alert
    would notice however long the start waits."""
    r = CollectorRegistry()
    Gauge(P + "ready", "1 when the agent is ready to work.", registry=r).set(0)
    _identify(r, site, queue)
    return r


def _identify(r: CollectorRegistry, site: str, queue: str) -> None:
    """Which agent this is (build info) and its process (CPU, memory, fds, GC), in every registry it serves."""
    Info(P + "build", "Version of the running agent.", registry=r).info(
        {"version": __version__, "site": site, "queue": queue})
    for standard in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
        r.register(standard)
