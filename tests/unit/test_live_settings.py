"""The live settings: one frozen snapshot, swapped whole on reload, read by every part at each use."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

from agent.settings import LIVE, LiveBox, LiveSettings, load_settings, reloaded

DSN = "postgresql://agent@db/agent"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for key in list(__import__("os").environ):
        if key.startswith("AGENT_"):
            monkeypatch.delenv(key)


def test_a_reload_takes_every_live_setting_from_the_new_settings():
    started = load_settings(None, database_url=DSN)
    new = load_settings(None, database_url=DSN, log_level="DEBUG", poll_interval=5, max_attempts=3, retry_base=0.5,
                        retry_max=9, device_timeout=2.5, heartbeat_interval=20, watchdog_stall=30,
                        guard_window=60, guard_off_min=7, guard_off_percent=50)
    live, restart = reloaded(started, new)
    assert live == LiveSettings("DEBUG", 5, 3, 0.5, 9, 2.5, 20, 30, 60, 7, 50)
    assert restart == []


def test_a_reload_names_the_settings_that_need_a_restart_and_keeps_them_out_of_the_snapshot():
    started = load_settings(None, database_url=DSN)
    live, restart = reloaded(started, load_settings(None, database_url=DSN, concurrency=4, queue="other",
                                                    device_timeout=3))
    assert restart == ["AGENT_CONCURRENCY", "AGENT_QUEUE"]
    assert live == dataclasses.replace(LiveSettings.of(started), device_timeout=3)


def test_a_reload_that_changes_nothing_names_nothing():
    started = load_settings(None, database_url=DSN)
    assert reloaded(started, load_settings(None, database_url=DSN)) == (LiveSettings.of(started), [])


def test_the_snapshot_cannot_be_changed_in_place():
    live = LiveSettings.of(load_settings(None, database_url=DSN))
    with pytest.raises(dataclasses.FrozenInstanceError):
        live.device_timeout = 99  # type: ignore[misc]


def test_whoever_holds_the_accessor_reads_the_snapshot_swapped_in():
    first = LiveSettings.of(load_settings(None, database_url=DSN))
    box = LiveBox(first)
    current = box.current  # what the drivers, the executor, the consumer... are given
    second = dataclasses.replace(first, device_timeout=42)
    assert box.swap(second) is first
    assert current() is second and current().device_timeout == 42



def test_the_daemon_reads_live_settings_through_the_box_never_off_the_settings_it_started_with():
    """A live setting read off `Settings` is a copy that goes stale after SIGHUP. Only the one-shot
    tools (agent/ops, agent/cli) may, and settings.py, which builds the snapshot."""
    root = Path(__file__).resolve().parents[2] / "agent"
    stale = []
    for path in sorted(root.rglob("*.py")):
        if path.parent.name in ("ops", "cli") or path.name == "settings.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in LIVE and _names_settings(node.value):
                stale.append(f"{path.relative_to(root.parent)}:{node.lineno} {ast.unparse(node)}")
    assert stale == []


def _names_settings(node: ast.expr) -> bool:
    """`settings`, `s`, `self.settings`, `self._s`: an expression for the settings object."""
    name = node.attr if isinstance(node, ast.Attribute) else getattr(node, "id", "")
    return name in ("settings", "s", "_s", "_settings")
