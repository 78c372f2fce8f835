"""What an operator sees when something is wrong: exit 2 and a message naming the setting, within
seconds, never a traceback nor a password; the support desk's `agentctl events`."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from urllib.parse import urlsplit, urlunsplit

import pytest

from tests.support.agents import agent_env, agentctl, spawn_agentd

pytestmark = pytest.mark.acceptance


def with_url(dsn: str, user: str | None = None, database: str | None = None, password: str | None = None) -> str:
    parts = urlsplit(dsn)
    host = parts.netloc.rpartition("@")[2]
    who = (user or parts.username or "") + (f":{password}" if password else "")
    return urlunsplit(parts._replace(netloc=f"{who}@{host}" if who else host,
                                     path="/" + database if database else parts.path))


def finish(proc: subprocess.Popen[str], timeout: float = 15) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def refusals(dsn: str) -> dict[str, str]:
    return {"unknown role": with_url(dsn, user="nobody_here", password="hunter2"),
            "unknown database": with_url(dsn, database="no_such_db", password="hunter2"),
            "bad port": "postgresql://agent:hunter2@127.0.0.1:abc/agent",
            "port out of range": "postgresql://agent:hunter2@127.0.0.1:99999/agent",
            "bad sslmode": with_query(with_url(dsn, password="hunter2"), "sslmode=sometimes"),
            "unknown parameter": with_query(with_url(dsn, password="hunter2"), "sslmod=require")}  # a typo


def with_query(dsn: str, extra: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(query=f"{parts.query}&{extra}" if parts.query else extra))


@pytest.mark.parametrize("case", ["unknown role", "unknown database", "bad port", "port out of range",
                                  "bad sslmode", "unknown parameter"])
def test_agentd_refuses_a_wrong_database_url_at_once_with_exit_2(dsn, case):
    started = time.monotonic()
    code, out = finish(spawn_agentd(refusals(dsn)[case]))
    assert code == 2, out
    assert time.monotonic() - started < 10  # no retry storm: the supervisor's restart policy takes over
    assert "AGENT_DATABASE_URL" in out and "hunter2" not in out and "Traceback" not in out
    assert "retrying" not in out


@pytest.mark.parametrize("case", ["unknown role", "unknown database", "bad port", "bad sslmode",
                                  "unknown parameter"])
def test_agentctl_names_the_setting_for_a_wrong_database_url(dsn, case):
    proc = agentctl(refusals(dsn)[case], "state", check=False)
    assert proc.returncode == 2
    assert "AGENT_DATABASE_URL" in proc.stderr and "hunter2" not in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr
    if case == "unknown parameter":  # not "cannot reach the database"
        assert "the server does not know a parameter (a mistyped query parameter?)" in proc.stderr
        assert 'unrecognized configuration parameter "sslmod"' in proc.stderr


@pytest.mark.parametrize("argv", [
    ["enqueue", "r1", "wifi", "on", "--not-after", "tomorrow"],
    ["enqueue", "r1", "wifi", "on", "--meta", "{bad"],
    ["events", "--since", "yesterday-ish"],
])
def test_bad_input_is_answered_without_a_traceback(dsn, argv):
    proc = agentctl(dsn, *argv, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "usage:" in proc.stderr


def test_versions():
    for module in ("agent.cli.agentctl", "agent"):
        proc = subprocess.run([sys.executable, "-m", module, "--version"], capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0 and proc.stdout.split()[1][0].isdigit()


def test_status_needs_no_database_url(tmp_path):
    env = {k: v for k, v in agent_env("x").items() if k != "AGENT_DATABASE_URL"}
    env |= {"AGENT_HTTP_LISTEN": "127.0.0.1:9", "AGENT_CONFIG": ""}
    proc = subprocess.run([sys.executable, "-m", "agent.cli.agentctl", "status", "--json"], env=env,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1 and json.loads(proc.stdout)["state"] == "down", proc.stderr


def test_config_after_the_subcommand_and_from_the_environment(dsn, tmp_path):
    path = tmp_path / "agent.toml"
    path.write_text(f'database_url = "{dsn}"\nsite = "north"\n')
    agentctl(dsn, "db", "init", "--site", "north", "--queue", "site_north")  # a site needs its queue first
    env = {k: v for k, v in agent_env(dsn).items() if k != "AGENT_DATABASE_URL"}
    run = [sys.executable, "-m", "agent.cli.agentctl"]
    added = subprocess.run([*run, "device", "add", "r1", "--driver", "sim", "--config", str(path)], env=env,
                           capture_output=True, text=True, timeout=30)
    assert added.returncode == 0 and "site north" in added.stdout, added.stderr
    listed = subprocess.run([*run, "device", "list", "--json"], env={**env, "AGENT_CONFIG": str(path)},
                            capture_output=True, text=True, timeout=30)
    assert [d["site"] for d in json.loads(listed.stdout)] == ["north"], listed.stderr


async def test_a_closed_pipe_is_not_a_database_error(dsn, db):
    await db.execute("INSERT INTO agent.devices (id, driver) SELECT 'r' || i, 'sim' FROM generate_series(1, 2000) i")
    env = agent_env(dsn)
    with subprocess.Popen([sys.executable, "-m", "agent.cli.agentctl", "device", "list"], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.readline()
        proc.stdout.close()  # what `| head -1` does
        err = proc.stderr.read()
        code = proc.wait(timeout=30)
    assert code == 141 and "database" not in err and "Traceback" not in err, err


def test_events_tell_what_happened_to_a_request(dsn):
    agentctl(dsn, "device", "add", "r1", "--driver", "sim")
    agentctl(dsn, "enqueue", "r1", "wifi", "on", "--request-id", "invoice-42")
    agentctl(dsn, "enqueue", "r1", "lan", "on", "--request-id", "invoice-43")
    code, out = finish(spawn_agentd(dsn, "--once"), timeout=60)
    assert code == 0, out
    rows = json.loads(agentctl(dsn, "events", "--request-id", "invoice-42", "--json").stdout)
    assert {r["request_id"] for r in rows} == {"invoice-42"} and "verified" in [r["kind"] for r in rows]
    assert [r["applied_at"].endswith("Z") for r in rows if r["kind"] == "verified"] == [True]  # it wrote: when
    assert all(r["at"].endswith("Z") and "T" in r["at"] for r in rows)  # RFC 3339 UTC
    assert [r["id"] for r in rows] == sorted(r["id"] for r in rows)  # oldest first
    assert json.loads(agentctl(dsn, "events", "--device", "r2", "--json").stdout) == []
    assert len(json.loads(agentctl(dsn, "events", "--device", "r1", "--since", "1h", "--json").stdout)) >= 2
    table = agentctl(dsn, "events", "--request-id", "invoice-43").stdout
    assert table.splitlines()[0].split()[:2] == ["AT", "KIND"] and "invoice-43" in table


def test_pause_and_resume_from_the_command_line(dsn):
    agentctl(dsn, "device", "add", "r1", "--driver", "sim")
    out = agentctl(dsn, "device", "pause", "r1", "--reason", "firmware upgrade").stdout
    assert "paused" in out
    assert json.loads(agentctl(dsn, "device", "list", "--json").stdout)[0]["paused"] == "firmware upgrade"
    assert agentctl(dsn, "device", "pause", "nope", check=False).returncode == 4  # not found
    agentctl(dsn, "device", "resume", "r1")
    assert json.loads(agentctl(dsn, "device", "list", "--json").stdout)[0]["paused"] is None


async def test_db_prune_dry_run_then_prune(dsn, db):
    await db.execute("INSERT INTO agent.events (at, kind) SELECT now() - interval '200 days', 'verified' "
                     "FROM generate_series(1, 3)")
    await db.execute("INSERT INTO agent.events (at, kind) VALUES (now(), 'verified')")
    dry = json.loads(agentctl(dsn, "db", "prune", "--dry-run", "--json").stdout)
    assert dry["dry_run"] is True and dry["rows"]["events"] == 3
    assert await db.fetchval("SELECT count(*) FROM agent.events") == 4
    text = agentctl(dsn, "db", "prune", retain_events_days=365).stdout
    assert "events       removed        0 (kept 365 days)" in text
    text = agentctl(dsn, "db", "prune", retain_archive_days=0).stdout
    assert "events       removed        3 (kept 180 days)" in text and "archive      kept forever" in text
    assert await db.fetchval("SELECT count(*) FROM agent.events") == 1


@pytest.mark.parametrize("case", ["unknown database", "bad port"])
def test_agentd_refuses_a_wrong_session_database_url_at_once_with_exit_2(dsn, case):
    """The pool's URL is fine; the session connection's (the one that bypasses PgBouncer) is refused."""
    started = time.monotonic()
    code, out = finish(spawn_agentd(dsn, session_database_url=refusals(dsn)[case]))
    assert code == 2, out
    assert time.monotonic() - started < 10
    assert "AGENT_SESSION_DATABASE_URL" in out and "hunter2" not in out and "Traceback" not in out


async def test_a_file_that_cannot_be_read_is_named_not_blamed_on_the_database(dsn, tmp_path):
    missing = agentctl(dsn, "device", "import", str(tmp_path / "nosuch.toml"), check=False)
    assert missing.returncode == 2
    assert f"cannot read {tmp_path / 'nosuch.toml'}: No such file or directory" in missing.stderr
    assert "database" not in missing.stderr


@pytest.mark.parametrize("command", [["state"], ["device", "list"], ["events"], ["dlq", "list"]])
def test_agentctl_on_a_database_never_initialised_says_to_run_db_init(empty_dsn, command):
    proc = agentctl(empty_dsn, *command, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "run `agentctl db init` as the database's owner" in proc.stderr and "Traceback" not in proc.stderr


def test_agentctl_naming_a_queue_the_database_lacks_says_so_not_db_init(dsn):
    proc = agentctl(dsn, "dlq", "list", check=False, queue="no_such_queue")
    assert proc.returncode == 2, proc.stderr
    assert "no such queue in this database: check AGENT_QUEUE" in proc.stderr and "db init` as" not in proc.stderr
