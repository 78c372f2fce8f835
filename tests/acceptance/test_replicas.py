"""Several agentd processes on one queue: every command once in effect, per-key order, one device
operated by one agent at a time."""

from __future__ import annotations

import json
import random

import pytest

from tests.support.agents import spawn_agentd
from tests.support.db import add_device, dlq, send
from tests.support.wait import until

pytestmark = pytest.mark.acceptance

# more devices than one agent can hold at once (prefetch 10), each slow enough that the burst outlasts
# one agent's first reads: the other finds devices nobody claimed yet and takes part
DEVICES = [f"r{n}" for n in range(1, 17)]
SERVICES = ["wifi", "voip", "tv"]


async def test_two_agents_share_a_queue_without_operating_one_device_twice(db, dsn, tmp_path):
    files = {d: tmp_path / f"{d}.json" for d in DEVICES}
    for d in DEVICES:
        await add_device(db, d, "sim", {"latency": 0.05, "state_file": str(files[d]), "failure_rate": 0.2,
                                        "seed": 7})
    common = {"retry_base": 0.05, "retry_max": 0.3, "batch_size": 5, "prefetch": 10, "poll_interval": 1}
    for n in (1, 2):
        spawn_agentd(dsn, agent_id=f"replica-{n}", **common)
    # two daemons starting at once on a machine a test suite keeps busy: 20 s once ran out
    # (alone the whole test takes 8 s)
    await until(lambda: db.fetchval("SELECT count(*) = 2 FROM agent.agents WHERE state = 'ready'"), timeout=60,
                what="both agents ready")
    rng = random.Random(42)
    newest: dict[tuple[str, str], str] = {}
    sent = 0
    async with db.transaction():  # one burst: more than one agent can keep up with, so both take part
        for i in range(150):
            device, service, state = rng.choice(DEVICES), rng.choice(SERVICES), rng.choice(["on", "off"])
            body = {"device": device, "service": service, "state": state, "request_id": f"req-{i}"}
            await send(db, body)
            sent += 1
            if rng.random() < 0.1:  # the producer's retry: same request_id again, must change nothing
                await send(db, body)
                sent += 1
            newest[(device, service)] = state

    async def settled() -> bool:  # a service never written reads as the sim default, off
        left = await db.fetchval('SELECT count(*) FROM pgmq."q_device_tasks"')
        return left == 0 and all(_file(files[d]).get(s, "off") == want for (d, s), want in newest.items())

    await until(settled, timeout=60, interval=0.2, what="every command settled on the devices")
    rows = await db.fetch("SELECT device, service, desired, observed FROM agent.service_state")
    assert {(r["device"], r["service"]): (r["desired"], r["observed"]) for r in rows} == \
        {k: (v, v) for k, v in newest.items()}
    assert await db.fetchval('SELECT count(*) FROM pgmq."a_device_tasks"') == sent  # each archived once
    assert await dlq(db) == []
    overlaps = [f for f in tmp_path.glob("*.overlaps")]
    assert overlaps == [], [f.read_text() for f in overlaps]
    workers = await db.fetch("SELECT DISTINCT agent_id FROM agent.events WHERE kind = 'verified'")
    assert {r["agent_id"] for r in workers} == {"replica-1", "replica-2"}  # both took part


def _file(path) -> dict[str, str]:
    try:
        return json.loads(path.read_text() or "{}")
    except (FileNotFoundError, ValueError):
        return {}
