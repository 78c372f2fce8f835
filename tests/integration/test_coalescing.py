"""Coalescing per device: the commands waiting for one device are taken together, the device is
read once for all of them, the services that differ are written, and one more read verifies them
all; per command, the rules stay exactly as they are."""

from __future__ import annotations

import json

from agent.errors import NoAnswerError, PermanentError, TransientError
from tests.support.agents import running_agent
from tests.support.db import add_device, archived, dlq, events, send, state
from tests.support.devices import BatchDriver, ScriptedDriver
from tests.support.wait import until


async def all_archived(db, ids: list[int]) -> bool:
    return all([await archived(db, i) for i in ids])


async def test_a_take_reads_once_writes_what_differs_and_verifies_once(db, dsn):
    await add_device(db, "r1")
    device = BatchDriver()
    device.states[("r1", "tv")] = "on"  # already as wanted: not written
    wifi_on = await send(db, {"device": "r1", "service": "wifi", "state": "on"})
    voip = await send(db, {"device": "r1", "service": "voip", "state": "on"})
    wifi_off = await send(db, {"device": "r1", "service": "wifi", "state": "off"})
    tv = await send(db, {"device": "r1", "service": "tv", "state": "on"})
    async with running_agent(dsn, device):  # all four wait in the lane when the agent starts
        await until(lambda: all_archived(db, [wifi_on, voip, wifi_off, tv]), what="all settled")
    assert [c.op for c in device.calls] == ["read_many", "apply", "read_many"]  # wifi is already off
    assert device.writes("r1", "voip") == ["on"] and device.writes("r1", "wifi") == []
    assert await events(db, wifi_on) == ["superseded"]  # older, in the same take: never sent
    assert await events(db, voip) == ["verified"]
    assert await events(db, wifi_off) == ["verified"] and await events(db, tv) == ["verified"]
    row = await state(db, "r1", "wifi")
    assert (row["desired"], row["desired_version"], row["observed"]) == ("off", wifi_off, "off")


async def test_a_service_that_fails_in_a_take_is_retried_alone(db, dsn):
    await add_device(db, "r1")
    device = BatchDriver()
    device.fail("r1", "voip", TransientError("busy"))
    ids = [await send(db, {"device": "r1", "service": s, "state": "on"}) for s in ("wifi", "voip", "tv")]
    async with running_agent(dsn, device):
        await until(lambda: all_archived(db, ids), what="all settled")
    assert await events(db, ids[0]) == ["verified"]
    assert await events(db, ids[1]) == ["failed", "retried", "verified"]
    assert await events(db, ids[2]) == ["verified"]
    assert device.writes("r1", "wifi") == ["on"] and device.writes("r1", "tv") == ["on"]  # not again


async def test_a_failed_batch_read_is_no_commands_failure_each_service_is_read_on_its_own(db, dsn):
    """The take's shared read is nobody's own: when it fails (a reply cut short, "not JSON"), the
    services are read one by one and the commands go on at their first attempt."""
    await add_device(db, "r1")
    device = BatchDriver()
    device.fail_reads("r1", PermanentError("r1: GET /list: the reply is not JSON"))
    ids = [await send(db, {"device": "r1", "service": s, "state": "on"}) for s in ("a", "b", "c")]
    async with running_agent(dsn, device, max_attempts=1):
        await until(lambda: all_archived(db, ids), what="all settled")
    for msg in ids:
        assert await events(db, msg) == ["verified"]
    assert await dlq(db) == []
    assert [(c.op, c.service) for c in device.calls[:4]] == [("read_many", "a,b,c"), ("read", "a"), ("read", "b"),
                                                               ("read", "c")]


async def test_after_a_failed_batch_read_only_a_command_whose_own_read_fails_fails(db, dsn):
    await add_device(db, "r1")
    device = BatchDriver()
    device.fail_reads("r1", TransientError("timeout talking to the router"))
    device.fail("r1", "gone", PermanentError("HTTP 404: no such secret"), on="read")
    ids = [await send(db, {"device": "r1", "service": s, "state": "on"}) for s in ("a", "gone", "b")]
    async with running_agent(dsn, device, max_attempts=1):
        await until(lambda: all_archived(db, ids), what="all settled")
    [entry] = await dlq(db)
    assert entry["message"]["service"] == "gone" and "no such secret" in entry["headers"]["reason"]
    assert await events(db, ids[0]) == ["verified"] and await events(db, ids[2]) == ["verified"]


async def test_a_failed_batch_read_back_is_no_commands_failure_either(db, dsn):
    """Written, then the shared read-back fails: each written service is read back on its own, and
    the commands are verified instead of dead-lettered after they were applied."""
    await add_device(db, "r1")
    device = BatchDriver()
    ids = [await send(db, {"device": "r1", "service": s, "state": "on"}) for s in ("a", "b")]
    original = device.apply

    async def apply_then_break_the_list(dev, service, state):
        await original(dev, service, state)
        if service == "b":
            device.fail_reads("r1", PermanentError("r1: GET /list: the reply is not JSON"))

    device.apply = apply_then_break_the_list  # type: ignore[method-assign]
    async with running_agent(dsn, device, max_attempts=1):
        await until(lambda: all_archived(db, ids), what="all settled")
    for msg in ids:
        assert await events(db, msg) == ["verified"]
    assert [c.op for c in device.calls] == ["read_many", "apply", "apply", "read_many", "read", "read"]


async def test_a_device_silent_to_a_read_and_a_probe_is_not_asked_for_the_rest_of_the_take(db, dsn):
    """A silent device is not read service by service, a whole deadline each: after a read and a
    probe without answer the take stops asking, and on the last attempt the VPN guard has its word."""
    await add_device(db, "r1")
    device = BatchDriver()
    silence = NoAnswerError("read on r1 timed out (2s per call)")
    device.fail_reads("r1", silence)
    device.fail("r1", "a", silence, on="read")
    device.fail("r1", "", NoAnswerError("probe on r1 timed out (2s per call)"), on="probe")
    asked: list[str] = []

    async def tunnel_unproven(dev, _since: float) -> str:
        asked.append(dev.id)
        return "tunnel_unproven: nothing heard from peer site-a since the attempt began"

    async with running_agent(dsn, device, max_attempts=1) as agent:
        agent.executor.confirm = tunnel_unproven
        async with db.transaction():  # visible at once: one take
            ids = [await send(db, {"device": "r1", "service": s, "state": "on"}) for s in ("a", "b", "c")]
        await until(lambda: all_archived(db, ids), timeout=15, what="applied once the parked take came back")
    assert [(c.op, c.service) for c in device.calls[:3]] == [("read_many", "a,b,c"), ("read", "a"), ("probe", "")]
    assert device.calls[3].op == "read_many"  # b and c were not asked one by one: the next take reads again
    assert asked == ["r1"] and await dlq(db) == []
    for msg in ids:
        kinds = await events(db, msg)
        assert kinds[:2] == ["failed", "parked"] and kinds[-1] == "verified", kinds


async def test_one_service_that_hangs_does_not_keep_the_others_of_the_take_from_being_read(db, dsn):
    """The device answers a probe after the read that hung: the others are read, written and
    verified; only the hanging one is retried."""
    await add_device(db, "r1")
    device = BatchDriver()
    device.fail_reads("r1", NoAnswerError("read on r1 timed out (2s per call)"))
    device.fail("r1", "a", NoAnswerError("read on r1 timed out (2s per call)"), on="read")
    async with running_agent(dsn, device):
        async with db.transaction():
            ids = [await send(db, {"device": "r1", "service": s, "state": "on"}) for s in ("a", "b", "c")]
        await until(lambda: all_archived(db, ids), what="all settled")
    assert [(c.op, c.service) for c in device.calls[:5]] == [("read_many", "a,b,c"), ("read", "a"), ("probe", ""),
                                                               ("read", "b"), ("read", "c")]
    assert await events(db, ids[0]) == ["failed", "retried", "verified"]
    assert await events(db, ids[1]) == ["verified"] and await events(db, ids[2]) == ["verified"]


async def test_a_permanent_error_in_a_take_dead_letters_only_that_command(db, dsn):
    await add_device(db, "r1")
    device = BatchDriver()
    device.fail("r1", "gone", PermanentError("no such secret"))
    ids = [await send(db, {"device": "r1", "service": s, "state": "on"}) for s in ("a", "gone", "b")]
    async with running_agent(dsn, device):
        await until(lambda: all_archived(db, ids), what="all settled")
    [entry] = await dlq(db)
    assert entry["message"]["service"] == "gone" and "no such secret" in entry["headers"]["reason"]
    assert await events(db, ids[0]) == ["verified"] and await events(db, ids[2]) == ["verified"]


async def test_max_parallel_writes_overlap_but_never_a_read(db, dsn):
    await add_device(db, "r1", options={"max_parallel": 4})
    await add_device(db, "r2")
    device = BatchDriver()
    device.latency.update({"r1": 0.05, "r2": 0.05})
    ids = [await send(db, {"device": d, "service": f"s{i}", "state": "on"}) for d in ("r1", "r2") for i in range(8)]
    async with running_agent(dsn, device):
        await until(lambda: all_archived(db, ids), timeout=20, what="all settled")
    assert device.max_active["r1"] == 4 and device.max_active["r2"] == 1
    assert not device.read_overlapped_write


async def test_a_driver_without_batch_reads_is_read_one_service_at_a_time(db, dsn):
    await add_device(db, "r1")
    device = ScriptedDriver()
    ids = [await send(db, {"device": "r1", "service": s, "state": "on"}) for s in ("a", "b")]
    async with running_agent(dsn, device):
        await until(lambda: all_archived(db, ids), what="all settled")
    assert [c.op for c in device.calls] == ["read", "read", "apply", "apply", "read", "read"]


async def test_a_take_for_an_unreachable_device_is_parked_whole_and_woken_at_once(db, dsn):
    await add_device(db, "r1")
    device = BatchDriver()
    tunnel = {"down": True}
    older = await send(db, {"device": "r1", "service": "wifi", "state": "off"})
    ids = [await send(db, {"device": "r1", "service": s, "state": "on"}) for s in ("wifi", "voip")]
    async with running_agent(dsn, device, max_attempts=1) as agent:
        agent.executor.gate = lambda dev: "peer site-a down" if tunnel["down"] else None
        await until(lambda: agent.parking.count == 2, what="the take parked")
        # settled at once, without the device (its report may still be on its way)
        await until(lambda: events(db, older), timeout=5, what="the superseded command's events recorded")
        assert await events(db, older) == ["superseded"]
        await until(lambda: db.fetchval('SELECT min(read_ct) >= 2 FROM pgmq."q_device_tasks"'), timeout=20,
                    what="re-parked past max_attempts")
        assert await dlq(db) == [] and device.calls == []
        tunnel["down"] = False
        await agent.wake_parked(["r1"])
        await until(lambda: all_archived(db, ids), timeout=5, what="applied within seconds")
    assert device.writes("r1", "wifi") == ["on"] and device.writes("r1", "voip") == ["on"]


async def test_a_burst_spread_over_many_devices_is_taken_whole_per_device(db, dsn):
    """Reading in queue order alone would spread AGENT_PREFETCH over every device of the burst (here
    one command per device per read of 10): when a device's lane is served while a backlog waits, its
    waiting commands are read too, so each device is read twice in all, not twice per command (on a
    loaded machine a lane may start before its top-up lands: then twice more, for a second take)."""
    devices = [f"r{n}" for n in range(10)]
    for dev in devices:
        await add_device(db, dev)
    ids = []
    for n in range(20):  # router-mixed, as a billing run sends them
        for dev in devices:
            ids.append(await send(db, {"device": dev, "service": f"cust{n}", "state": "on"}))
    device = BatchDriver()
    async with running_agent(dsn, device, concurrency=1, batch_size=10, prefetch=10, coalesce=100):
        await until(lambda: all_archived(db, ids), timeout=30, what="all settled")
    reads = {dev: device.batch_reads(dev) for dev in devices}
    assert all(n in (2, 4) for n in reads.values()), reads  # one take (or two), never one per command (40)
    assert all(device.writes(dev, f"cust{n}") == ["on"] for dev in devices for n in range(20))


async def test_the_lanes_served_at_once_are_topped_up_by_one_read(db, dsn):
    """A burst over many devices: the lanes that ask to be topped up while a top-up read is under way
    are topped up together by the next read, one statement for all of them, not one each (a
    month-end burst's two hundred lanes were most of its statements)."""
    devices = [f"r{n}" for n in range(10)]
    for dev in devices:
        await add_device(db, dev)
    device = BatchDriver()
    async with running_agent(dsn, device, concurrency=10, batch_size=10, prefetch=10, coalesce=100) as agent:
        reads: list[list[str]] = []
        read_devices = agent.consumer._read_devices

        async def counted(wanted: dict[str, int]) -> None:
            reads.append(sorted(wanted))
            await read_devices(wanted)

        agent.consumer._read_devices = counted  # type: ignore[method-assign]
        bodies = [json.dumps({"device": dev, "service": f"cust{n}", "state": "on"})
                  for n in range(20) for dev in devices]  # router-mixed, visible at once
        ids = list(await db.fetchval("SELECT array_agg(m) FROM pgmq.send_batch('device_tasks', $1::jsonb[]) m",
                                     bodies))
        await until(lambda: all_archived(db, ids), timeout=30, what="all settled")
    asked = [dev for read in reads for dev in read]
    assert asked and len(reads) < len(asked) and max(len(read) for read in reads) > 1, reads
    assert all(device.writes(dev, f"cust{n}") == ["on"] for dev in devices for n in range(20))


async def test_a_replay_in_the_same_take_as_its_original_is_accepted_once_and_written_once(db, dsn):
    """A DLQ replay keeps its original's version: with the original still waiting they are one
    command twice, accepted as one (not two rows for one key in one statement) and written once."""
    await add_device(db, "r1")
    device = BatchDriver()
    body = {"device": "r1", "service": "wifi", "state": "on", "request_id": "pay-7"}
    original = await send(db, body)
    replay = await db.fetchval("SELECT pgmq.send('device_tasks', $1::jsonb, $2::jsonb)", json.dumps(body),
                               json.dumps({"origin_msg_id": original}))
    async with running_agent(dsn, device, max_attempts=1):
        await until(lambda: all_archived(db, [original, replay]), what="both settled")
    assert await dlq(db) == []
    assert await events(db, original) == await events(db, replay) == ["verified"]
    assert device.writes("r1", "wifi") == ["on"]
    row = await state(db, "r1", "wifi")
    assert (row["desired"], row["desired_version"]) == ("on", original)


async def test_a_take_whose_acceptance_failed_records_no_desire_of_a_command_not_yet_judged(db, dsn):
    """The database refused the take's acceptance once (a lock timeout): its commands are retried,
    and their failure records no desired state, since none was judged. Else the resent suspend, a
    duplicate, would stand as the newest desire and supersede the payment on the retry."""
    await add_device(db, "r1")
    device = BatchDriver()
    async with running_agent(dsn, device) as agent:
        suspend = await send(db, {"device": "r1", "service": "wifi", "state": "off", "request_id": "suspend-42"})
        await until(lambda: archived(db, suspend), what="suspended")
        await db.execute("""
            CREATE SEQUENCE refusals;
            CREATE FUNCTION refuse_once() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF nextval('refusals') = 1 THEN
                    RAISE EXCEPTION 'canceling statement due to lock timeout' USING ERRCODE = '55P03';
                END IF;
                RETURN NULL;
            END $$;
            CREATE TRIGGER refuse_once BEFORE INSERT ON agent.requests
                FOR EACH STATEMENT EXECUTE FUNCTION refuse_once();
        """)
        async with db.transaction():  # one take
            paid = await send(db, {"device": "r1", "service": "wifi", "state": "on", "request_id": "paid-42"})
            resent = await send(db, {"device": "r1", "service": "wifi", "state": "off", "request_id": "suspend-42"})
        await until(lambda: all_archived(db, [paid, resent]), what="both settled")
        assert agent.acceptor.flushes >= 3
    assert await events(db, paid) == ["failed", "retried", "verified"]
    assert await events(db, resent) == ["failed", "retried", "duplicate"]
    assert device.states[("r1", "wifi")] == "on"
    row = await state(db, "r1", "wifi")
    assert (row["desired"], row["desired_version"], row["observed"]) == ("on", paid, "on")
