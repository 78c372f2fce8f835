"""agentd and agentctl as an operator runs them: subprocesses against a real database."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from tests.support.agents import agentctl, spawn_agentd
from tests.support.db import archived, dlq, events, send, state
from tests.support.wait import until

pytestmark = pytest.mark.acceptance


def finish(proc: subprocess.Popen[str], timeout: float = 30) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


class Daemon:
    """An agentd the test runs: after its block, `code` and `out` are its exit status and output."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.code: int | None = None
        self.out = ""

    def crash(self) -> None:
        """SIGKILL: the process dies where it is, with no report and no release."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)


@contextmanager
def daemon(dsn: str, **settings: Any) -> Iterator[Daemon]:
    """agentd running for the block, stopped with SIGTERM at its end (unless the block crashed it)."""
    d = Daemon(spawn_agentd(dsn, **settings))
    try:
        yield d
    finally:
        if d.proc.poll() is None:
            d.proc.send_signal(signal.SIGTERM)
        d.code, d.out = finish(d.proc)


async def once(dsn: str, timeout: float = 30, **settings: Any) -> tuple[int, str]:
    """`agentd --once` to its end (off the event loop: a device the test serves answers meanwhile)."""
    return await asyncio.to_thread(finish, spawn_agentd(dsn, "--once", **settings), timeout)


async def test_daemon_applies_commands_and_stops_cleanly_on_sigterm(db, dsn):
    agentctl(dsn, "device", "add", "r1", "--driver", "sim", "--option", "latency=0.01")
    with daemon(dsn, poll_interval=60) as agentd:
        msg = int(agentctl(dsn, "enqueue", "r1", "wifi", "on", "--request-id", "pay-1").stdout)
        await until(lambda: archived(db, msg), timeout=15, what="command applied")
    assert agentd.code == 0, agentd.out
    row = await state(db, "r1", "wifi")
    assert (row["desired"], row["observed"], row["last_request_id"]) == ("on", "on", "pay-1")
    assert "stopped" in agentd.out


async def test_once_drains_the_queue_and_exits_zero(db, dsn):
    agentctl(dsn, "device", "add", "r1", "--driver", "sim")
    ids = [int(agentctl(dsn, "enqueue", "r1", f"s{i}", "on").stdout) for i in range(5)]
    code, out = await once(dsn)
    assert code == 0, out
    assert all([await archived(db, i) for i in ids])
    assert "5 done, 0 retry later, 0 dead-lettered" in out


async def test_once_exits_non_zero_when_something_failed(db, dsn):
    agentctl(dsn, "device", "add", "r1", "--driver", "sim")
    agentctl(dsn, "device", "add", "broken", "--driver", "sim", "--option", "failure_rate=1",
             "--option", "failure_kind=permanent")
    agentctl(dsn, "enqueue", "r1", "wifi", "on")
    agentctl(dsn, "enqueue", "broken", "wifi", "on")
    code, out = await once(dsn)
    assert code == 1, out
    [entry] = await dlq(db)
    assert "injected permanent failure" in entry["headers"]["reason"]


async def test_bad_setting_fails_at_start_naming_it(dsn):
    code, out = finish(spawn_agentd(dsn, concurrency=0))
    assert code == 2 and "AGENT_CONCURRENCY" in out


async def test_uninitialised_database_is_refused_with_the_fix(empty_dsn):
    code, out = await once(empty_dsn)
    assert code == 2 and "agentctl db init" in out


async def test_crash_between_device_write_and_report_loses_nothing(db, dsn, tmp_path):
    """SIGKILL after the device was written but before the report: the message comes back."""
    device_file = tmp_path / "r1.json"
    agentctl(dsn, "device", "add", "r1", "--driver", "sim", "--option", "latency=0.6",
             "--option", f"state_file={device_file}")
    with daemon(dsn, visibility_timeout=2) as agentd:
        msg = int(agentctl(dsn, "enqueue", "r1", "wifi", "on").stdout)
        # read (0.6 s), apply (0.6 s): the write lands, then the read-back is under way
        await until(lambda: device_file.exists() and json.loads(device_file.read_text()) == {"wifi": "on"},
                    timeout=10, what="device written")
        agentd.crash()
    assert not await archived(db, msg)
    accepted = await state(db, "r1", "wifi")  # the intent was recorded before the device was touched
    assert (accepted["desired"], accepted["observed"], accepted["verified_at"]) == ("on", "unknown", None)
    await until(lambda: db.fetchval('SELECT vt <= clock_timestamp() FROM pgmq."q_device_tasks" WHERE msg_id = $1',
                                    msg), timeout=10, what="lease of the dead daemon ran out")
    code, out = await once(dsn, timeout=60)
    assert code == 0, out
    assert await archived(db, msg)
    row = await state(db, "r1", "wifi")
    assert (row["desired"], row["observed"]) == ("on", "on")
    assert await events(db, msg) == ["verified"]  # second delivery found it done: no second write


async def test_agentctl_inventory_round_trip(db, dsn, tmp_path):
    agentctl(dsn, "device", "add", "r1", "--driver", "sim", "--address", "10.0.0.1",
             "--option", "latency=0.5", "--option", "initial=on", "--credential", "r1-admin")
    devices = json.loads(agentctl(dsn, "device", "list", "--json").stdout)
    assert devices == [{"id": "r1", "driver": "sim", "address": "10.0.0.1", "site": "default",
                        "options": {"latency": 0.5, "initial": "on"}, "credential": "r1-admin",
                        "paused": None}]
    f = tmp_path / "devices.toml"
    f.write_text('[[device]]\nid = "r2"\ndriver = "sim"\n\n[[device]]\nid = "r3"\ndriver = "sim"\n')
    assert "2 device(s) imported" in agentctl(dsn, "device", "import", str(f)).stdout
    agentctl(dsn, "device", "remove", "r1")
    ids = [d["id"] for d in json.loads(agentctl(dsn, "device", "list", "--json").stdout)]
    assert ids == ["r2", "r3"]
    bad = agentctl(dsn, "device", "add", "r4", "--driver", "nosuch", check=False)
    assert bad.returncode == 2 and "unknown driver 'nosuch'" in bad.stderr
    bad = agentctl(dsn, "device", "add", "r4", "--driver", "sim", "--option", "failure_rate=7", check=False)
    assert bad.returncode == 2 and "failure_rate" in bad.stderr
    bad = agentctl(dsn, "enqueue", "ghost", "wifi", "on", check=False)
    assert bad.returncode == 4, bad.stderr  # not found, as for every command
    assert "agentctl: unknown device 'ghost': add it first (agentctl device add)" in bad.stderr
    bad = agentctl(dsn, "enqueue", "r2", "wifi", "maybe", check=False)
    assert bad.returncode == 2 and "invalid choice: 'maybe'" in bad.stderr
    bad = agentctl(dsn, "enqueue", "r2", "wifi", "on", "--request-id", "", check=False)
    assert bad.returncode == 2 and "agentctl: request_id must be 1 to 200 characters" in bad.stderr


async def test_agentctl_dlq_list_and_replay(db, dsn):
    agentctl(dsn, "enqueue", "r1", "wifi", "on", check=False)  # unknown device: refused at enqueue
    await send(db, {"device": "r9", "service": "wifi", "state": "on"})
    code, _ = await once(dsn)
    assert code == 1
    [entry] = json.loads(agentctl(dsn, "dlq", "list", "--json").stdout)
    assert "unknown device 'r9'" in entry["reason"]
    agentctl(dsn, "device", "add", "r9", "--driver", "sim")
    out = agentctl(dsn, "dlq", "replay", str(entry["dlq_id"])).stdout
    assert f"replayed DLQ entry {entry['dlq_id']}" in out
    code, out = await once(dsn)
    assert code == 0, out
    assert (await state(db, "r9", "wifi"))["observed"] == "on"
    assert json.loads(agentctl(dsn, "dlq", "list", "--json").stdout) == []


async def test_a_dead_letter_whose_headers_are_not_an_object_is_listed_and_replayed_with_the_others(db, dsn):
    """A plain pgmq.send may carry headers that are any JSON: the dead letter keeps them whole beside
    its reason, and one such entry does not stop `dlq list` or `dlq replay --all` for every other."""
    agentctl(dsn, "device", "add", "r1", "--driver", "sim")
    odd = await db.fetchval("SELECT pgmq.send('device_tasks', $1::jsonb, $2::jsonb)",
                            json.dumps({"device": "r1", "service": "a", "state": "on"}), '["trace-1"]')
    await send(db, {"device": "r1", "service": "b", "state": "ON"})  # an ordinary bad message
    assert (await once(dsn))[0] == 1
    first, _second = await dlq(db)
    assert first["headers"]["original_headers"] == ["trace-1"]
    assert first["headers"]["origin_msg_id"] == odd and "invalid headers" in first["headers"]["reason"]
    listed = json.loads(agentctl(dsn, "dlq", "list", "--json").stdout)
    assert len(listed) == 2 and listed[0]["origin_msg_id"] == odd
    assert "invalid headers" in listed[0]["reason"] and "invalid command" in listed[1]["reason"]
    assert "invalid headers" in agentctl(dsn, "dlq", "list").stdout
    out = agentctl(dsn, "dlq", "replay", "--all").stdout
    assert out.count("replayed DLQ entry") == 2
    assert await dlq(db) == []


async def test_dead_letters_of_an_older_release_with_array_headers_are_still_read(db, dsn):
    """Before the fix the reason was appended to an array of headers: such entries stay readable."""
    await db.fetchval("SELECT pgmq.send('device_tasks_dlq', $1::jsonb, $2::jsonb)",
                      json.dumps({"device": "r1", "service": "a", "state": "on"}),
                      json.dumps(["trace-1", {"reason": "invalid headers: must be a JSON object", "origin_msg_id": 7}]))
    await db.fetchval("SELECT pgmq.send('device_tasks_dlq', '{}'::jsonb, '\"just text\"'::jsonb)")
    listed = json.loads(agentctl(dsn, "dlq", "list", "--json").stdout)
    assert [(e["reason"], e["origin_msg_id"]) for e in listed] == [
        ("invalid headers: must be a JSON object", 7), (None, None)]
    assert agentctl(dsn, "dlq", "replay", "--all").stdout.count("replayed DLQ entry") == 2


async def test_older_command_replayed_after_a_crash_never_overrides_the_newer_one(db, dsn, tmp_path):
    """The newer command was written to the device but the daemon died before reporting it.
    Its intent was committed first, so the older command, replayed meanwhile, is superseded."""
    older = await db.fetchval("SELECT pgmq.send('device_tasks', '{\"device\": \"r1\", \"service\": \"wifi\", "
                              "\"state\": \"off\"}')")  # r1 is not in the inventory yet: dead-lettered
    assert (await once(dsn))[0] == 1
    device_file = tmp_path / "r1.json"
    agentctl(dsn, "device", "add", "r1", "--driver", "sim", "--option", "latency=0.5",
             "--option", f"state_file={device_file}")
    with daemon(dsn, visibility_timeout=5) as agentd:
        newer = int(agentctl(dsn, "enqueue", "r1", "wifi", "on").stdout)
        await until(lambda: device_file.exists() and json.loads(device_file.read_text()) == {"wifi": "on"},
                    timeout=10, what="device written")
        agentd.crash()
    agentctl(dsn, "dlq", "replay", "--all")
    code, out = await once(dsn)  # the newer message is still leased by the dead daemon
    assert code == 0, out
    replayed = await db.fetchval("SELECT max(msg_id) FROM pgmq.\"a_device_tasks\"")
    assert replayed > newer and await events(db, replayed) == ["replayed", "superseded"]
    assert json.loads(device_file.read_text()) == {"wifi": "on"}
    assert (await state(db, "r1", "wifi"))["desired"] == "on"
    assert older < newer


async def test_health_endpoints_on_the_loopback_listener(dsn):
    import socket

    import aiohttp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with daemon(dsn, http_listen=f"127.0.0.1:{port}") as agentd:
        async with aiohttp.ClientSession() as http:
            async def status(path: str) -> int | None:
                try:
                    async with http.get(f"http://127.0.0.1:{port}{path}") as resp:
                        return resp.status
                except aiohttp.ClientConnectionError:
                    return None

            await until(lambda: status("/readyz"), timeout=15, what="HTTP up")
            await until(lambda: _is(status("/readyz"), 200), timeout=10, what="ready")
            assert await status("/healthz") == 200
    assert agentd.code == 0, agentd.out


async def _is(coro, expected) -> bool:
    return await coro == expected


async def test_http_device_end_to_end(db, dsn):
    from tests.support.httpdevice import HttpDevice

    box = await HttpDevice().start()
    box.secrets = {"alice": "true", "bob": "false"}
    try:
        agentctl(dsn, "device", "add", "router-1", "--driver", "http", "--address", f"127.0.0.1:{box.port}",
                 "--option", "read_path=/rest/ppp/secret/{service}", "--option", "set_method=PATCH",
                 "--option", "state_pointer=/disabled", "--option", 'on_value="false"',
                 "--option", 'off_value="true"', "--option", 'set_body={"disabled": "{value}"}')
        agentctl(dsn, "enqueue", "router-1", "alice", "on")
        agentctl(dsn, "enqueue", "router-1", "bob", "off")
        agentctl(dsn, "enqueue", "router-1", "carol", "on")  # the router has no such secret: HTTP 404
        code, out = await once(dsn)  # the device answers meanwhile
    finally:
        await box.stop()
    assert code == 1, out  # carol was dead-lettered
    assert box.secrets == {"alice": "false", "bob": "true"}
    assert (await state(db, "router-1", "alice"))["observed"] == "on"
    assert (await state(db, "router-1", "bob"))["observed"] == "off"
    [entry] = await dlq(db)
    assert entry["message"]["service"] == "carol" and "HTTP 404" in entry["headers"]["reason"]


async def registered(db, agent_id: str, pid: int) -> bool:  # type: ignore[no-untyped-def]
    return await db.fetchval("SELECT pid = $2 AND state = 'ready' FROM agent.agents WHERE agent_id = $1",
                             agent_id, pid) or False


async def test_a_second_agentd_with_a_live_agent_id_exits_2_and_a_restart_of_a_dead_one_starts(db, dsn, tmp_path):
    device_file = tmp_path / "r1.json"
    agentctl(dsn, "device", "add", "r1", "--driver", "sim", "--option", f"state_file={device_file}")
    with daemon(dsn, agent_id="gw1", poll_interval=60) as first:
        await until(lambda: registered(db, "gw1", first.pid), timeout=20, what="gw1 running")
        code, out = finish(spawn_agentd(dsn, agent_id="gw1"))  # a copy of gw1's config, started again
        assert code == 2, out
        assert f"AGENT_AGENT_ID 'gw1' is in use by a running agent on this host (pid {first.pid}" in out, out
        assert "Traceback" not in out
        msg = int(agentctl(dsn, "enqueue", "r1", "wifi", "on").stdout)
        await until(lambda: archived(db, msg), timeout=15, what="gw1 still at work")
        first.crash()  # its heartbeat is fresh, its process is gone
    with daemon(dsn, agent_id="gw1", poll_interval=60) as restarted:
        await until(lambda: registered(db, "gw1", restarted.pid), timeout=20, what="gw1 restarted")
        msg = int(agentctl(dsn, "enqueue", "r1", "wifi", "off").stdout)
        await until(lambda: archived(db, msg), timeout=15, what="the restarted gw1 at work")
        restarted.crash()
    # gone from a host this one cannot look into: it may start once the heartbeat is stale
    await db.execute("UPDATE agent.agents SET host_id = 'gw-old/boot:x/pidns:1', last_heartbeat = now() - "
                     "interval '1 hour' WHERE agent_id = 'gw1'")
    code, out = await once(dsn, agent_id="gw1")
    assert code == 0, out
    assert json.loads(device_file.read_text()) == {"wifi": "off"}
    assert await db.fetchval("SELECT state FROM agent.agents WHERE agent_id = 'gw1'") == "stopped"  # id free again
