"""The live settings: one frozen snapshot, swapped whole on reload, read by every part at each use."""

from __future__ import annotations

import dataclasses

import pytest

from agent.settings import LiveBox, LiveSettings, load_settings, reloaded

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
