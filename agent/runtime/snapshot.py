"""What the agent tells people: one status line (systemd STATUS=, heartbeat row, first line of
`agentctl status`) and the fuller snapshot behind /status. Pure functions of plain figures."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Figures:
    agent_id: str
    site: str
    queue: str
    version: str
    started: bool = False
    stopping: bool = False
    uptime_s: float = 0.0
    database_error: str | None = None
    listener_up: bool = False            # the session connection (LISTEN, leadership) is up
    session_error: str | None = None     # why it is not, while it reconnects
    vpn_required: bool = False
    vpn_error: str | None = None
    inflight: int = 0
    parked: int = 0
    done: int = 0
    retried: int = 0
    dead_lettered: int = 0
    queue_depth: int | None = None
    queue_oldest_s: float | None = None
    dlq_depth: int | None = None
    last_cycle_ms: float | None = None
    recent_failures: list[dict[str, Any]] = field(default_factory=list)
    drifted: list[dict[str, Any]] = field(default_factory=list)
    unreachable: list[dict[str, Any]] = field(default_factory=list)
    peers: list[dict[str, Any]] = field(default_factory=list)
    budgets: list[dict[str, Any]] = field(default_factory=list)  # devices with a max_rate or a breaker not closed
    leader: bool = False                 # leads its site's reconciliation
    next_reconcile: str | None = None


def state(f: Figures) -> str:
    if f.stopping:
        return "stopping"
    if not f.started:
        return "starting"
    if problems(f):
        return "degraded"
    return "ready"


def problems(f: Figures) -> list[str]:
    out = []
    if f.database_error:
        out.append(f"database unreachable, reconnecting ({f.database_error})")
    elif not f.listener_up:
        out.append("session connection (LISTEN, leadership) down, reconnecting"
                   + (f" ({f.session_error})" if f.session_error else ""))
    if f.vpn_required and f.vpn_error:
        out.append(f"VPN: {f.vpn_error}")
    return out


def healthy(f: Figures) -> bool:
    return state(f) == "ready"


def status_line(f: Figures) -> str:
    head = state(f)
    parts = problems(f)
    queue = "queue ?" if f.queue_depth is None else f"queue {f.queue_depth}"
    if f.queue_oldest_s is not None and f.queue_depth:
        queue += f" (oldest {_age(f.queue_oldest_s)})"
    parts += [f"{f.inflight} in flight", queue]
    if f.parked:
        parts.append(f"{f.parked} parked")
    if opened := sum(1 for b in f.budgets if b.get("breaker") != "closed"):
        parts.append(f"{opened} breaker{'s' if opened > 1 else ''} open")
    if f.dlq_depth:
        parts.append(f"DLQ {f.dlq_depth}")
    parts.append(f"{f.done} done, {f.retried} retried, {f.dead_lettered} dead-lettered")
    return f"{head}: " + "; ".join(parts)


def snapshot(f: Figures) -> dict[str, Any]:
    return {"state": state(f), "status": status_line(f), "healthy": healthy(f), **asdict(f)}


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"
