"""Errors that say what to do: connection refusals sorted by remedy, bad CLI input refused with a
usage message, one timestamp format, where the settings file is found."""

from __future__ import annotations

import argparse
from datetime import datetime, timedelta, timezone

import asyncpg
import pytest

from agent.cli import args as argtypes
from agent.cli.agentctl import build_parser
from agent.db.connect import classify, reason, redact
from agent.model.device import Device
from agent.runtime import daemon
from agent.settings import DEFAULT_CONFIG, config_path, load_settings
from agent.text import json_default, rfc3339
from agent.vpn.guard import VpnGuard

DSN = "postgresql://agent:hunter2@db.example:5432/agent"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for key in list(__import__("os").environ):
        if key.startswith("AGENT_"):
            monkeypatch.delenv(key)


@pytest.mark.parametrize("exc, words", [
    (asyncpg.InvalidPasswordError("password authentication failed for user \"agent\""), "password"),
    (asyncpg.InvalidAuthorizationSpecificationError("role \"agent\" does not exist"), "role"),
    (asyncpg.InvalidCatalogNameError("database \"agent\" does not exist"), "database does not exist"),
    (asyncpg.InsufficientPrivilegeError("permission denied for database"), "CONNECT"),
    (asyncpg.ClientConfigurationError("`sslmode` parameter must be one of: disable, ..."), "parameter"),
    (asyncpg.UndefinedObjectError('unrecognized configuration parameter "sslmod"'), "mistyped query parameter"),
    (ConnectionError("PostgreSQL server at \"db:5432\" rejected SSL upgrade"), "sslmode"),
    (ValueError("invalid literal for int() with base 10: 'abc'"), "not a valid connection URL"),
    (OverflowError("connect(): port must be 0-65535."), "not a valid connection URL"),
])
def test_refusals_that_retrying_cannot_heal_name_the_setting_not_the_password(exc, words):
    err = classify(exc, DSN)
    assert err is not None and err.kind == "config"
    assert "AGENT_DATABASE_URL" in str(err) and words in str(err) and "hunter2" not in str(err)


@pytest.mark.parametrize("exc", [
    ConnectionRefusedError(111, "Connect call failed"), TimeoutError(), asyncpg.CannotConnectNowError("starting up"),
    asyncpg.TooManyConnectionsError("too many clients"), OSError(113, "No route to host"),
])
def test_an_unreachable_or_busy_server_is_worth_a_retry(exc):
    assert classify(exc, DSN) is None


@pytest.mark.parametrize("exc, words", [
    (TimeoutError(), "TimeoutError"), (ConnectionResetError(), "ConnectionResetError"),
    (asyncpg.ConnectionDoesNotExistError(""), "ConnectionDoesNotExistError"), (RuntimeError(), "RuntimeError"),
    (OSError(113, "No route to host"), "No route to host"),
])
def test_a_failure_without_a_message_still_says_why(exc, words):
    assert words in reason(exc)


async def test_waiting_for_the_database_says_why_it_is_unreachable(monkeypatch, caplog):
    async def silent_pooler(*_args, **_kwargs):
        raise TimeoutError()  # what a PgBouncer that cannot reach Postgres gives asyncpg: no message
    monkeypatch.setattr(daemon.asyncpg, "create_pool", silent_pooler)
    monkeypatch.setattr(daemon.random, "uniform", lambda _a, _b: 0.0)  # no backoff wait in a unit test
    with pytest.raises(TimeoutError):
        await daemon.connect_pool(load_settings(None, database_url=DSN), attempts=2)
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("database unreachable")]
    assert said and "()" not in said[0] and "TimeoutError" in said[0]


def test_a_password_echoed_by_the_server_is_masked():
    err = classify(asyncpg.InvalidPasswordError("bad password hunter2"), DSN)
    assert "hunter2" not in str(err)


def test_redact_keeps_everything_but_the_password():
    assert redact(DSN) == "postgresql://agent:***@db.example:5432/agent"
    assert redact("postgresql://agent@db/agent") == "postgresql://agent@db/agent"


@pytest.mark.parametrize("argv", [
    ["enqueue", "r1", "wifi", "on", "--not-after", "tomorrow"],
    ["enqueue", "r1", "wifi", "on", "--not-after", "2026-03-01T12:00:00"],  # no offset: ambiguous
    ["enqueue", "r1", "wifi", "on", "--meta", "{bad"],
    ["enqueue", "r1", "wifi", "on", "--meta", "[1, 2]"],
    ["events", "--since", "last week"],
])
def test_bad_input_is_a_usage_error(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(argv)
    assert exit_.value.code == 2 and "Traceback" not in capsys.readouterr().err


def test_good_input_is_parsed():
    a = build_parser().parse_args(["enqueue", "r1", "wifi", "on", "--not-after", "2026-03-01T12:00:00Z",
                                   "--meta", '{"invoice": 42}'])
    assert a.not_after == datetime(2026, 3, 1, 12, tzinfo=timezone.utc) and a.meta == {"invoice": 42}


def test_since_takes_an_age_or_a_time():
    now = datetime(2026, 3, 1, 12, tzinfo=timezone.utc)
    assert argtypes.since("12h", now) == now - timedelta(hours=12)
    assert argtypes.since("7d", now) == now - timedelta(days=7)
    assert argtypes.since("2026-02-01T00:00:00+01:00", now).utcoffset() == timedelta(hours=1)


def test_config_is_accepted_after_the_subcommand_too():
    p = build_parser()
    assert p.parse_args(["--config", "a.toml", "db", "init"]).config == "a.toml"
    assert p.parse_args(["db", "init", "--config", "b.toml"]).config == "b.toml"
    assert p.parse_args(["dlq", "list", "--json", "--config", "c.toml"]).config == "c.toml"
    assert not hasattr(p.parse_args(["db", "init"]), "config")


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith("agentctl ")


def test_config_path_order(monkeypatch, tmp_path):
    assert config_path("x.toml") == __import__("pathlib").Path("x.toml")
    monkeypatch.setenv("AGENT_CONFIG", str(tmp_path / "env.toml"))
    assert config_path(None) == tmp_path / "env.toml"
    monkeypatch.setenv("AGENT_CONFIG", "")
    assert config_path(None) is None
    monkeypatch.delenv("AGENT_CONFIG")
    assert config_path(None) == (DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None)


def test_the_environment_variable_naming_the_file_is_not_a_setting(monkeypatch, tmp_path):
    path = tmp_path / "agent.toml"
    path.write_text('database_url = "postgresql://agent@db/agent"\n')
    monkeypatch.setenv("AGENT_CONFIG", str(path))
    assert load_settings(config_path(None)).database_url == "postgresql://agent@db/agent"


def test_a_command_without_a_database_needs_no_url():
    assert load_settings(need_database=False).http_listen == "127.0.0.1:9477"
    with pytest.raises(Exception, match="AGENT_DATABASE_URL is required"):
        load_settings()


def test_other_bad_settings_are_still_refused_without_a_database(monkeypatch):
    monkeypatch.setenv("AGENT_CONCURRENCY", "0")
    with pytest.raises(Exception, match="AGENT_CONCURRENCY"):
        load_settings(need_database=False)


def test_machine_output_times_are_rfc3339_utc():
    t = datetime(2026, 3, 1, 13, 0, 0, 123456, tzinfo=timezone(timedelta(hours=1)))
    assert rfc3339(t) == "2026-03-01T12:00:00.123Z"
    assert json_default(t) == "2026-03-01T12:00:00.123Z"
    assert rfc3339(0.0) == "1970-01-01T00:00:00.000Z"


def _guard(devices: list[Device]) -> VpnGuard:
    async def wake(_ids: list[str]) -> None: ...
    return VpnGuard(False, None, 180, 1, lambda: devices, None, "a", wake)  # type: ignore[arg-type]


def test_a_paused_device_is_gated_with_its_reason():
    guard = _guard([])
    assert guard.gate(Device("r1", "sim", paused="firmware upgrade")) == "paused: firmware upgrade"
    assert guard.gate(Device("r1", "sim")) is None


def test_a_pause_that_ended_is_reported_once():
    devices = [Device("r1", "sim", paused="x"), Device("r2", "sim")]
    guard = _guard(devices)
    assert guard.resumed() == []
    devices[0] = Device("r1", "sim")
    assert guard.resumed() == ["r1"]
    assert guard.resumed() == []


def test_argparse_errors_are_usage_errors():
    with pytest.raises(argparse.ArgumentTypeError):
        argtypes.json_object("{bad")


@pytest.mark.parametrize(("error", "kind", "said"), [
    (asyncpg.NoDataFoundError("agent.enqueue: unknown device 'r9'"), "not_found",  # a permanent error: exit 4
     "unknown device 'r9': add it first (agentctl device add)"),
    (asyncpg.ObjectNotInPrerequisiteStateError("agent.enqueue: queue 'q_n' of the device's site does not exist"),
     "config", "queue 'q_n' of the device's site does not exist"),
    (asyncpg.InvalidParameterValueError("agent.enqueue: state must be 'on' or 'off', got 'x'"), "permanent",
     "state must be 'on' or 'off', got 'x'"),
])
def test_enqueue_refusals_are_sorted_by_what_to_do(error, kind, said):
    from agent.ops.admin import enqueue_refusal

    refusal = enqueue_refusal(error)
    assert refusal is not None and refusal.kind == kind and str(refusal).startswith(said)


def test_other_database_errors_are_not_enqueue_refusals():
    from agent.ops.admin import enqueue_refusal

    assert enqueue_refusal(asyncpg.SerializationError("could not serialize")) is None
