from __future__ import annotations

import pytest

from agent.errors import ConfigError
from agent.settings import load_settings

DSN = "postgresql://agent:s3cret@db/agent"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for key in list(__import__("os").environ):
        if key.startswith("AGENT_"):
            monkeypatch.delenv(key)


def test_defaults(monkeypatch):
    monkeypatch.setenv("AGENT_DATABASE_URL", DSN)
    s = load_settings()
    assert (s.queue, s.dlq, s.http_host_port) == ("device_tasks", "device_tasks_dlq", ("127.0.0.1", 9477))


def test_missing_database_url_is_named():
    with pytest.raises(ConfigError, match="AGENT_DATABASE_URL is required"):
        load_settings()


@pytest.mark.parametrize("key, value", [
    ("CONCURRENCY", "0"), ("POLL_INTERVAL", "soon"), ("QUEUE", "Bad-Name"), ("HTTP_LISTEN", "9477"),
    ("VISIBILITY_TIMEOUT", "1"), ("LOG_FORMAT", "xml"), ("MAX_ATTEMPTS", "-1"),
])
def test_bad_setting_fails_naming_the_variable(monkeypatch, key, value):
    monkeypatch.setenv("AGENT_DATABASE_URL", DSN)
    monkeypatch.setenv(f"AGENT_{key}", value)
    with pytest.raises(ConfigError, match=f"AGENT_{key}"):
        load_settings()


def test_a_bad_database_url_is_named_without_echoing_it(monkeypatch):
    monkeypatch.setenv("AGENT_DATABASE_URL", "mysql://root:hunter2@db")
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert "AGENT_DATABASE_URL" in str(err.value) and "hunter2" not in str(err.value)


def test_toml_file_with_environment_overriding(tmp_path, monkeypatch):
    path = tmp_path / "agent.toml"
    path.write_text(f'database_url = "{DSN}"\nqueue = "site_a"\nconcurrency = 4\n')
    monkeypatch.setenv("AGENT_CONCURRENCY", "9")
    s = load_settings(path)
    assert (s.queue, s.concurrency) == ("site_a", 9)


def test_unknown_key_in_toml_is_refused(tmp_path):
    path = tmp_path / "agent.toml"
    path.write_text(f'database_url = "{DSN}"\nconcurency = 4\n')
    with pytest.raises(ConfigError, match="unknown setting `concurency`"):
        load_settings(path)


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.toml")


def test_the_default_agent_id_is_the_host_and_the_site_the_same_across_restarts(monkeypatch):
    monkeypatch.setattr("socket.gethostname", lambda: "gw7")
    monkeypatch.setenv("AGENT_DATABASE_URL", DSN)
    assert load_settings().agent_id == "gw7-default"
    monkeypatch.setenv("AGENT_SITE", "north")
    assert load_settings().agent_id == load_settings().agent_id == "gw7-north"  # no pid in it
    monkeypatch.setenv("AGENT_AGENT_ID", "")
    assert load_settings().agent_id == "gw7-north"
    monkeypatch.setenv("AGENT_AGENT_ID", "edge-1")
    assert load_settings().agent_id == "edge-1"
