"""Executor semantics against real Postgres + PGMQ, with a scripted device at the far edge."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone

import asyncpg
import pytest

from agent.errors import ConfigError, NoAnswerError, PermanentError, TransientError
from tests.support.agents import running_agent
from tests.support.db import add_device, archived, dlq, events, queue_len, send, state, writes
from tests.support.devices import ScriptedDriver
from tests.support.wait import until


@pytest.fixture
def device() -> ScriptedDriver:
    return ScriptedDriver()


async def test_command_is_applied_verified_reported_and_archived(db, dsn, device):
    await add_device(db, "r1")
    listener = await asyncpg.connect(dsn)
    notes: list[str] = []
    await listener.add_listener("agent_state", lambda *a: notes.append(a[3]))
    async with running_agent(dsn, device):
        msg = await send(db, {"device": "r1", "service": "wifi", "state": "on", "request_id": "pay-1",
                              "meta": {"order": 7}})
        await until(lambda: archived(db, msg), what="archive")
    row = await state(db, "r1", "wifi")
    assert (row["desired"], row["observed"], row["desired_version"]) == ("on", "on", msg)
    assert row["applied_at"] is not None and row["verified_at"] >= row["applied_at"]
    assert row["last_request_id"] == "pay-1" and row["last_error"] is None
    assert await events(db, msg) == ["verified"]  # one row: the write is on it
    assert await writes(db, msg) == ["verified"]
    assert await db.fetchval("SELECT applied_at FROM agent.events WHERE msg_id = $1", msg) == row["applied_at"]
    assert device.states[("r1", "wifi")] == "on"
    await until(lambda: notes, what="agent_state notification")
    assert '"observed" : "on"' in notes[-1] or '"observed": "on"' in notes[-1]
    await listener.close()


async def test_write_that_answers_ok_but_does_not_stick_is_not_success(db, dsn, device):
    await add_device(db, "r1")
    device.lie("r1", "wifi")
    async with running_agent(dsn, device, max_attempts=1):
        msg = await send(db, {"device": "r1", "service": "wifi", "state": "on"})
        await until(lambda: archived(db, msg))
    row = await state(db, "r1", "wifi")
    assert row["observed"] == "off" and row["verified_at"] is None and row["applied_at"] is not None
    assert "verification failed" in row["last_error"]
    assert await events(db, msg) == ["failed", "dead_lettered"]
    assert await writes(db, msg) == ["failed"]  # written, and the read-back said otherwise


async def test_a_command_already_in_effect_is_verified_without_a_write(db, dsn, device):
    await add_device(db, "r1")
    device.states[("r1", "wifi")] = "on"
    async with running_agent(dsn, device):
        msg = await send(db, {"device": "r1", "service": "wifi", "state": "on"})
        await until(lambda: archived(db, msg), what="archive")
    assert await events(db, msg) == ["verified"] and await writes(db, msg) == []
    assert (await state(db, "r1", "wifi"))["applied_at"] is None


async def test_older_command_failing_transiently_never_overrides_newer(db, dsn, device):
    await add_device(db, "r1")
    device.fail("r1", "wifi", TransientError("device busy"))
    async with running_agent(dsn, device, coalesce=1):  # one command at a time (coalesced: see test_coalescing)
        older = await send(db, {"device": "r1", "service": "wifi", "state": "on"})
        newer = await send(db, {"device": "r1", "service": "wifi", "state": "off"})
        await until(lambda: archived(db, older), what="older archived")
        await until(lambda: archived(db, newer), what="newer archived")
    assert await events(db, older) == ["failed", "retried", "superseded"]
    assert device.writes("r1", "wifi") == ["on"]  # the failed try only; never re-sent after "off"
    row = await state(db, "r1", "wifi")
    assert (row["desired"], row["observed"], row["desired_version"]) == ("off", "off", newer)


async def test_commands_for_one_service_take_effect_in_enqueue_order(db, dsn, device):
    await add_device(db, "r1")
    device.latency["r1"] = 0.01
    async with running_agent(dsn, device, coalesce=1):  # each one applied (coalesced, only the newest is)
        ids = [await send(db, {"device": "r1", "service": "wifi", "state": s}) for s in ["on", "off", "on", "off"]]
        await until(lambda: all_archived(db, ids))
    assert device.writes("r1", "wifi") == ["on", "off", "on", "off"]
    assert (await state(db, "r1", "wifi"))["desired_version"] == ids[-1]


async def test_one_operation_at_a_time_per_device(db, dsn, device):
    await add_device(db, "r1")
    device.latency["r1"] = 0.02
    async with running_agent(dsn, device, concurrency=8):
        ids = [await send(db, {"device": "r1", "service": f"s{i}", "state": "on"}) for i in range(8)]
        await until(lambda: all_archived(db, ids))
    assert device.max_active["r1"] == 1


async def test_same_message_delivered_twice_changes_nothing(db, dsn, device):
    await add_device(db, "r1")
    async with running_agent(dsn, device):
        msg = await send(db, {"device": "r1", "service": "wifi", "state": "on"})
        await until(lambda: archived(db, msg))
        # deliver the very same command again (as after a lost lease): the same version, which a
        # queue row carries in origin_msg_id once it has another msg_id (every insert draws a new one)
        again = await db.fetchval("SELECT pgmq.send('device_tasks', message, jsonb_build_object('origin_msg_id', "
                                  'msg_id)) FROM pgmq."a_device_tasks" WHERE msg_id = $1', msg)
        await until(lambda: archived(db, again))
    assert device.writes("r1", "wifi") == ["on"]
    assert (await state(db, "r1", "wifi"))["observed"] == "on"


async def test_same_request_id_twice_changes_nothing(db, dsn, device):
    await add_device(db, "r1")
    async with running_agent(dsn, device):
        first = await send(db, {"device": "r1", "service": "wifi", "state": "on", "request_id": "pay-9"})
        await until(lambda: archived(db, first))
        again = await send(db, {"device": "r1", "service": "wifi", "state": "off", "request_id": "pay-9"})
        await until(lambda: archived(db, again))
    assert await events(db, again) == ["duplicate"]
    assert device.writes("r1", "wifi") == ["on"]
    assert (await state(db, "r1", "wifi"))["desired"] == "on"


async def test_expired_command_is_recorded_not_executed(db, dsn, device):
    await add_device(db, "r1")
    past = (datetime.now(timezone.utc) - timedelta(seconds=1)).isoformat()
    async with running_agent(dsn, device):
        msg = await send(db, {"device": "r1", "service": "wifi", "state": "on", "not_after": past})
        await until(lambda: archived(db, msg))
    assert await events(db, msg) == ["expired"]
    assert device.calls == []


async def test_refresh_reads_and_reports_without_changing(db, dsn, device):
    await add_device(db, "r1")
    device.states[("r1", "wifi")] = "on"
    async with running_agent(dsn, device):
        msg = await send(db, {"device": "r1", "service": "wifi", "action": "refresh"})
        await until(lambda: archived(db, msg))
    row = await state(db, "r1", "wifi")
    assert (row["observed"], row["desired"]) == ("on", None)
    assert device.writes("r1", "wifi") == []
    assert await events(db, msg) == ["refreshed"]


async def test_permanent_device_error_goes_to_dlq_and_work_goes_on(db, dsn, device):
    await add_device(db, "r1")
    device.fail("r1", "vpn", PermanentError("HTTP 404 from device: no such service"))
    async with running_agent(dsn, device):
        bad = await send(db, {"device": "r1", "service": "vpn", "state": "on"})
        good = await send(db, {"device": "r1", "service": "wifi", "state": "on"})
        await until(lambda: all_archived(db, [bad, good]))
    [entry] = await dlq(db)
    assert entry["message"] == {"device": "r1", "service": "vpn", "state": "on"}
    assert "404" in entry["headers"]["reason"] and entry["headers"]["origin_msg_id"] == bad
    assert await events(db, bad) == ["failed", "dead_lettered"]
    assert (await state(db, "r1", "wifi"))["observed"] == "on"


async def test_transient_failures_past_max_attempts_are_dead_lettered(db, dsn, device):
    await add_device(db, "r1")
    device.fail("r1", "wifi", TransientError("timeout"), times=10)
    async with running_agent(dsn, device, max_attempts=3):
        msg = await send(db, {"device": "r1", "service": "wifi", "state": "on"})
        await until(lambda: archived(db, msg), timeout=15)
    [entry] = await dlq(db)
    assert entry["headers"]["reason"].startswith("gave up after 3 attempts")
    assert (await events(db, msg)).count("retried") == 2


POISON = [
    ('{"device": "r1", "service": "wifi", "state": "maybe"}', "state"),
    ('{"device": "r1", "state": "on"}', "service: Field required"),
    ('{"device": 5, "service": "wifi", "state": "on"}', "device"),
    ('{"device": "r1", "service": "wifi", "state": "on", "action": "reboot"}', "action"),
    ('{"device": "ghost", "service": "wifi", "state": "on"}', "unknown device 'ghost'"),
    ('[1, 2, 3]', "must be a JSON object, got an array"),
    ('"on"', "must be a JSON object, got a string"),
    ('42', "must be a JSON object, got a number"),
    ('null', "null"),
    ('{"device": "r1", "service": "wifi", "state": "on", "colour": "red"}', "colour"),
    ('{"device": "r1", "service": "wifi", "state": "on", "not_after": "tomorrow"}', "not_after"),
    ('{"device": "r1", "service": "wifi", "state": "on", "meta": {"pad": "' + "x" * 70000 + '"}}', "byte limit"),
]


async def test_poison_messages_end_in_dlq_with_a_reason_while_good_ones_flow(db, dsn, device):
    await add_device(db, "r1")
    async with running_agent(dsn, device):
        ids = []
        for i, (body, _) in enumerate(POISON):
            ids.append(await send(db, body, raw=True))
            await send(db, {"device": "r1", "service": f"s{i}", "state": "on"})
        await until(lambda: _empty(db), what="queue drained")
    entries = {e["headers"]["origin_msg_id"]: e for e in await dlq(db)}
    assert sorted(entries) == ids
    for msg_id, (_, expected) in zip(ids, POISON):
        assert expected in entries[msg_id]["headers"]["reason"], entries[msg_id]["headers"]["reason"]
    assert len([k for k in device.states if k[0] == "r1"]) == len(POISON)


async def test_dlq_replay_keeps_the_commands_place_in_order(db, dsn, device):
    from agent.db.queries import Queries
    from agent.ops import admin

    await add_device(db, "r1")
    device.fail("r1", "wifi", PermanentError("HTTP 400"))
    async with running_agent(dsn, device):
        older = await send(db, {"device": "r1", "service": "wifi", "state": "on"})
        [entry] = await until(lambda: dlq(db))
        assert entry["headers"]["origin_msg_id"] == older
        newer = await send(db, {"device": "r1", "service": "wifi", "state": "off"})
        await until(lambda: archived(db, newer))
        [(_, replayed)] = await admin.dlq_replay(db, Queries("device_tasks"), None)
        await until(lambda: archived(db, replayed))
    assert await events(db, replayed) == ["replayed", "superseded"]  # who replayed it, then its outcome
    assert (await state(db, "r1", "wifi"))["desired"] == "off"
    assert await dlq(db) == []


async def test_device_added_while_running_is_seen_within_seconds(db, dsn, device):
    async with running_agent(dsn, device):
        await add_device(db, "late")
        msg = await send(db, {"device": "late", "service": "wifi", "state": "on"})
        await until(lambda: archived(db, msg), timeout=5)
    assert await events(db, msg) == ["verified"]


async def test_long_operation_keeps_its_lease(db, dsn, device):
    await add_device(db, "slow")
    device.latency["slow"] = 1.2  # three calls: 3.6 s, longer than the 2 s lease
    async with running_agent(dsn, device, visibility_timeout=2):
        msg = await send(db, {"device": "slow", "service": "wifi", "state": "on"})
        await until(lambda: device.calls, what="first call")
        stolen = []
        while not await archived(db, msg):
            stolen += await db.fetch("SELECT msg_id FROM pgmq.read('device_tasks', 30, 10)")
            await asyncio.sleep(0.2)
    assert stolen == []
    assert await events(db, msg) == ["verified"]


async def all_archived(db, ids) -> bool:
    return all([await archived(db, i) for i in ids])


async def _empty(db) -> bool:
    return await queue_len(db) == 0


async def test_a_driver_bug_is_retried_not_stranded(db, dsn, device):
    class Buggy(ScriptedDriver):
        async def read(self, dev, service):  # type: ignore[override]
            if not self.calls:
                self.calls.append(None)  # type: ignore[arg-type]
                raise KeyError("oops")
            return await super().read(dev, service)

    buggy = Buggy()
    await add_device(db, "r1")
    async with running_agent(dsn, buggy):
        msg = await send(db, {"device": "r1", "service": "wifi", "state": "on"})
        await until(lambda: archived(db, msg))
    assert await events(db, msg) == ["failed", "retried", "verified"]


async def test_unreachable_device_is_parked_without_using_attempts_and_woken_at_once(db, dsn, device):
    await add_device(db, "r1")
    tunnel = {"down": True}
    async with running_agent(dsn, device, max_attempts=2, coalesce=1) as agent:  # coalesced: test_coalescing
        agent.executor.gate = lambda dev: "peer site-a down" if tunnel["down"] else None
        older = await send(db, {"device": "r1", "service": "wifi", "state": "off"})
        newer = await send(db, {"device": "r1", "service": "wifi", "state": "on"})
        await until(lambda: agent.parking.count == 2, what="both parked")
        await until(lambda: db.fetchval('SELECT min(read_ct) >= 3 FROM pgmq."q_device_tasks"'), timeout=20,
                    what="parked and re-parked past max_attempts")  # backoff base 2 s, capped
        assert await dlq(db) == [] and device.calls == []
        tunnel["down"] = False
        await agent.wake_parked(["r1"])
        await until(lambda: all_archived(db, [older, newer]), timeout=3, what="applied within seconds")
    assert (await state(db, "r1", "wifi"))["observed"] == "on"
    assert (await events(db, older))[-1] == "superseded"
    assert device.writes("r1", "wifi") == ["on"]


async def test_a_write_without_answer_on_the_last_attempt_parks_when_the_tunnel_is_unproven(db, dsn, device):
    """The read answered, the write did not, and no attempt is left: before giving up, the VPN guard is
    asked whether the tunnel carried anything since; unproven, the command waits instead of dying."""
    await add_device(db, "r1")
    device.fail("r1", "wifi", NoAnswerError("apply on r1 timed out (2s per call)"))
    asked: list[str] = []

    async def tunnel_unproven(dev, _since: float) -> str:
        asked.append(dev.id)
        return "tunnel_unproven: nothing heard from peer site-a since the attempt began"

    async with running_agent(dsn, device, max_attempts=1) as agent:
        agent.executor.confirm = tunnel_unproven
        msg = await send(db, {"device": "r1", "service": "wifi", "state": "on"})
        await until(lambda: archived(db, msg), timeout=15, what="applied once the parked command came back")
    assert asked == ["r1"]
    assert await dlq(db) == []
    kinds = await events(db, msg)
    assert "parked" in kinds and kinds[-1] == "verified", kinds
    assert device.writes("r1", "wifi") == ["on", "on"]


async def test_a_device_that_hangs_is_cut_off_at_the_deadline_and_retried(db, dsn, device):
    await add_device(db, "r1")
    device.latency["r1"] = 5.0
    async with running_agent(dsn, device, device_timeout=0.2, max_attempts=1):
        msg = await send(db, {"device": "r1", "service": "wifi", "state": "on"})
        await until(lambda: archived(db, msg), timeout=5)
    [entry] = await dlq(db)
    assert "read on r1 timed out (0.2s per call)" in entry["headers"]["reason"]


class _ForgetsItsCredentialAfterAWrite(ScriptedDriver):
    """Takes every write, then refuses the read-back as a wrong credential and loses the write (so the
    next attempt writes again)."""

    wrote = False

    async def apply(self, device, service, state):  # type: ignore[no-untyped-def]
        await super().apply(device, service, state)
        self.wrote = True

    async def read(self, device, service):  # type: ignore[no-untyped-def]
        if self.wrote:
            self.wrote = False
            self.states.pop((device.id, service), None)
            raise ConfigError("the router refused the login: wrong credential")
        return await super().read(device, service)


async def test_a_write_whose_attempt_ends_in_a_repeated_park_still_has_its_row(db, dsn):
    """The first misconfigured park records the failure, its write as its applied_at; a repeat of the
    same park records no failure, so the write it made gets an `applied` row of its own."""
    driver = _ForgetsItsCredentialAfterAWrite()
    await add_device(db, "r1")
    async with running_agent(dsn, driver):
        msg = await send(db, {"device": "r1", "service": "wifi", "state": "on"})
        await until(lambda: driver.writes("r1", "wifi") == ["on", "on"] and writes(db, msg), timeout=15,
                    what="two attempts, each with a write")
        await until(lambda: _two_writes_recorded(db, msg), timeout=10, what="the second write recorded")
    rows = await db.fetch("SELECT kind, applied_at FROM agent.events WHERE msg_id = $1 ORDER BY id", msg)
    assert [r["kind"] for r in rows][:3] == ["failed", "parked", "applied"]  # later repeats add `applied` rows
    assert rows[0]["applied_at"] is not None and rows[2]["applied_at"] > rows[0]["applied_at"]


async def _two_writes_recorded(db: asyncpg.Connection, msg: int) -> bool:
    return len(await writes(db, msg)) == 2
