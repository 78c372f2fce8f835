"""What grows is cleaned, through agentctl: agents that are gone, service keys that are retired, dead
letters that are garbage; and one exit status (4) for "no such thing" across commands."""

from __future__ import annotations

import json
import signal

import pytest

from agent import __version__
from agent.db.schema import SCHEMA_VERSION
from tests.support.agents import agentctl, spawn_agentd
from tests.support.db import send
from tests.support.wait import until

pytestmark = pytest.mark.acceptance

NOT_FOUND = 4
FAST = {"heartbeat_interval": 1}  # an agent not heard of for 3 s is stale


def fleet(dsn: str) -> tuple[int, str]:
    proc = agentctl(dsn, "status", "--fleet", check=False, **FAST)
    return proc.returncode, proc.stdout


async def test_a_killed_agent_is_stale_until_forgotten_and_a_site_without_a_live_agent_fails(dsn, db):
    agentctl(dsn, "device", "add", "r1", "--driver", "sim")
    code, out = fleet(dsn)
    assert code == 1 and "site default has devices and no live agent" in out

    proc = spawn_agentd(dsn, **FAST)
    try:
        await until(lambda: fleet(dsn)[0] == 0, timeout=20, what="the site served by a ready agent")
        [me] = [r["agent_id"] for r in await db.fetch("SELECT agent_id FROM agent.agents")]
        refused = agentctl(dsn, "agent", "forget", me, check=False, **FAST)
        assert refused.returncode == 2 and "is live" in refused.stderr
        status = json.loads(agentctl(dsn, "db", "status", "--json").stdout)
        assert [(a["agent_id"], a["version"], a["schema"]) for a in status["agents"]] == \
            [(me, __version__, SCHEMA_VERSION)]
        assert f"{__version__}, schema {SCHEMA_VERSION}, ready" in agentctl(dsn, "db", "status").stdout
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=10)

    await until(lambda: "STALE" in fleet(dsn)[1], timeout=20, what="the killed agent seen as stale")
    code, out = fleet(dsn)
    assert code == 1 and "has devices and no live agent" in out
    assert f"agent {me} forgotten" in agentctl(dsn, "agent", "forget", me, **FAST).stdout
    assert await db.fetchval("SELECT count(*) FROM agent.agents") == 0
    assert agentctl(dsn, "agent", "forget", me, check=False).returncode == NOT_FOUND


async def test_an_agent_keeps_its_default_id_across_restarts(dsn, db):
    agentctl(dsn, "device", "add", "r1", "--driver", "sim")
    for _ in range(2):
        proc = spawn_agentd(dsn, "--once")
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out
    ids = [r["agent_id"] for r in await db.fetch("SELECT agent_id FROM agent.agents")]
    assert len(ids) == 1 and ids[0].endswith("-default")  # one row, not one per process


@pytest.mark.parametrize("argv", [
    ("enqueue", "ghost", "wifi", "on"),
    ("device", "remove", "ghost"), ("device", "pause", "ghost"), ("device", "resume", "ghost"),
    ("dlq", "replay", "999"),
    ("sync", "--device", "ghost", "--no-wait"), ("sync", "--show", "999"),
    ("agent", "forget", "ghost"),
    ("dlq", "drop", "999", "--reason", "junk"), ("service", "forget", "ghost", "wifi"),
    ("batch", "show", "ghost"), ("guard", "status", "--site", "ghost"),  # device test: test_device_test_cli
])
def test_naming_something_that_does_not_exist_exits_4(dsn, argv):
    proc = agentctl(dsn, *argv, check=False)
    assert proc.returncode == NOT_FOUND, (proc.returncode, proc.stderr)
    assert proc.stderr.startswith("agentctl: ") and "Traceback" not in proc.stderr


async def test_service_forget_and_device_remove_leave_no_state_behind(dsn, db):
    agentctl(dsn, "device", "add", "r1", "--driver", "sim")
    for service in ("pppoe:alice", "pppoe:bob", "pppoe:carol"):
        agentctl(dsn, "enqueue", "r1", service, "on")
    proc = spawn_agentd(dsn, "--once")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out

    out = agentctl(dsn, "service", "forget", "r1", "pppoe:alice").stdout
    assert "r1/pppoe:alice forgotten" in out
    assert [r["service"] for r in json.loads(agentctl(dsn, "state", "--json").stdout)] == ["pppoe:bob", "pppoe:carol"]
    assert agentctl(dsn, "service", "forget", "r1", "pppoe:alice", check=False).returncode == NOT_FOUND
    bad = agentctl(dsn, "service", "forget", "r1", "no spaces", check=False)
    assert bad.returncode == 2 and "not a valid service key" in bad.stderr

    assert "device r1 removed; 2 service key(s) forgotten" in agentctl(dsn, "device", "remove", "r1").stdout
    assert json.loads(agentctl(dsn, "state", "--device", "r1", "--json").stdout) == []
    forgotten = [r for r in json.loads(agentctl(dsn, "events", "--device", "r1", "--json").stdout)
                 if r["kind"] == "forgotten"]
    assert [r["service"] for r in forgotten] == ["pppoe:alice", "pppoe:bob", "pppoe:carol"]
    assert all(r["error"].startswith("forgotten by ") and "agentctl " in r["error"] for r in forgotten)
    assert "device removed" in forgotten[-1]["error"]


async def test_a_dead_letter_is_dropped_with_a_reason_and_a_replay_is_recorded(dsn, db):
    await send(db, '"just a string"', raw=True)
    await send(db, {"device": "r9", "service": "wifi", "state": "on", "request_id": "pay-77"})
    proc = spawn_agentd(dsn, "--once")
    proc.communicate(timeout=60)
    entries = json.loads(agentctl(dsn, "dlq", "list", "--json").stdout)  # in the order their reports committed
    [garbage] = [e["dlq_id"] for e in entries if e["message"] == "just a string"]
    [unknown] = [e["dlq_id"] for e in entries if isinstance(e["message"], dict)]

    assert agentctl(dsn, "dlq", "drop", str(garbage), "--reason", "x", "999", check=False).returncode == 2  # usage
    assert agentctl(dsn, "dlq", "drop", str(garbage), "999", "--reason", "junk", check=False).returncode == NOT_FOUND
    out = agentctl(dsn, "dlq", "drop", str(garbage), "--reason", "not a command: junk from a test").stdout
    assert f"dropped DLQ entry {garbage}" in out
    assert [e["dlq_id"] for e in json.loads(agentctl(dsn, "dlq", "list", "--json").stdout)] == [unknown]
    assert await db.fetchval("SELECT count(*) FROM pgmq.a_device_tasks_dlq WHERE msg_id = $1", garbage) == 1
    dropped = await db.fetchrow("SELECT * FROM agent.events WHERE kind = 'dropped'")
    meta = json.loads(dropped["meta"])
    assert meta["reason"] == "not a command: junk from a test" and meta["dlq_id"] == garbage
    assert "agentctl " in meta["by"] and dropped["error"].startswith("dropped by ")

    agentctl(dsn, "device", "add", "r9", "--driver", "sim")
    new_id = int(agentctl(dsn, "dlq", "replay", str(unknown)).stdout.split()[-1])
    kinds = [(r["kind"], r["msg_id"]) for r in json.loads(agentctl(dsn, "events", "--request-id", "pay-77",
                                                                   "--json").stdout)]
    assert kinds[-1] == ("replayed", new_id) and ("dead_lettered", kinds[0][1]) in kinds
    replayed = await db.fetchrow("SELECT * FROM agent.events WHERE kind = 'replayed'")
    assert (replayed["device"], replayed["service"]) == ("r9", "wifi")
    assert json.loads(replayed["meta"])["dlq_id"] == unknown and "replayed by " in replayed["error"]
