"""Property: whatever the interleaving of commands, transient device failures, duplicate deliveries,
out-of-band edits and reconciliation rounds, over one agent or two, once things are quiet (and one
last reconcile has run) every device holds the newest command for each service, and Postgres says
exactly that.

Real agentd processes and a real database; the devices are simulated, with their state in files
that the test edits behind the agents' back.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.agents import spawn_agentd
from tests.support.db import add_device, dlq, send
from tests.support.wait import until

pytestmark = pytest.mark.acceptance

DEVICES, SERVICES = 2, 3
_examples = itertools.count()

command = st.tuples(st.just("command"), st.integers(0, DEVICES - 1), st.integers(0, SERVICES - 1),
                    st.sampled_from(["on", "off"]), st.booleans())           # booleans: the producer sends it twice
edit = st.tuples(st.just("edit"), st.integers(0, DEVICES - 1), st.integers(0, SERVICES - 1),
                 st.sampled_from(["on", "off"]))                             # someone changes the device by hand
redeliver = st.tuples(st.just("redeliver"))                                  # PGMQ hands a message out again
reconcile = st.tuples(st.just("reconcile"))                                  # a sync round, asked mid-stream
pause = st.tuples(st.just("pause"), st.sampled_from([0.0, 0.02, 0.1]))
settle = st.tuples(st.just("settle"))                                        # everything so far applied
steps = st.lists(st.one_of(command, command, edit, edit, redeliver, reconcile, pause, settle), min_size=1,
                 max_size=25)
failure_rates = st.lists(st.sampled_from([0.0, 0.2, 0.3]), min_size=DEVICES, max_size=DEVICES)


@pytest.fixture(params=[1, 2], ids=["one agent", "two agents"])
async def agents(request, db, dsn):
    for n in range(request.param):
        spawn_agentd(dsn, agent_id=f"prop-{n}", retry_base=0.02, retry_max=0.1, max_attempts=40,
                     reconcile_schedule="off", reconcile_pace=0, poll_interval=1, visibility_timeout=5)
    await until(lambda: db.fetchval("SELECT count(*) FROM agent.agents WHERE state = 'ready'"),
                timeout=20, what="agents ready")
    await until(lambda: db.fetchval("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"),
                timeout=20, what="a reconcile leader")
    return request.param


@settings(max_examples=10, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(plan=steps, rates=failure_rates)
async def test_after_quiescence_every_device_holds_the_newest_command(db, agents, plan, rates):
    example = next(_examples)
    where = Path(tempfile.mkdtemp(prefix="agent-prop-"))
    ids = [f"x{example}d{i}" for i in range(DEVICES)]
    files = [where / f"{d}.json" for d in ids]
    for d, f, rate in zip(ids, files, rates):
        await add_device(db, d, "sim", {"state_file": str(f), "failure_rate": rate, "latency": 0.003})
    newest: dict[tuple[str, str], str] = {}
    n = 0
    for step in plan:
        kind = step[0]
        if kind == "command":
            _, dev, svc, state, twice = step
            n += 1
            body = {"device": ids[dev], "service": f"s{svc}", "state": state, "request_id": f"x{example}-{n}"}
            for _ in range(2 if twice else 1):
                await send(db, body)
            newest[(ids[dev], f"s{svc}")] = state
        elif kind == "edit":
            _, dev, svc, state = step
            _write(files[dev], {**_read(files[dev]), f"s{svc}": state})
        elif kind == "redeliver":
            await db.execute('UPDATE pgmq."q_device_tasks" SET vt = clock_timestamp() WHERE msg_id = '
                             '(SELECT max(msg_id) FROM pgmq."q_device_tasks")')
        elif kind == "settle":
            await _quiet(db)
        elif kind == "reconcile":
            await db.fetchval("SELECT agent.request_sync('default')")
        else:
            await asyncio.sleep(step[1])  # lets the agents get in between the next steps

    await _quiet(db)
    final = await db.fetchval("SELECT agent.request_sync('default')")  # the last edit may postdate everything
    await until(lambda: db.fetchval("SELECT finished_at IS NOT NULL FROM agent.sync_runs WHERE id = $1", final),
                timeout=60, interval=0.05, what="final reconcile")
    await _quiet(db)

    for (device, service), want in newest.items():
        f = files[ids.index(device)]
        assert _read(f).get(service, "off") == want, (device, service, _read(f))
        row = await db.fetchrow("SELECT desired, observed FROM agent.service_state WHERE device = $1 AND "
                                "service = $2", device, service)
        assert (row["desired"], row["observed"]) == (want, want), (device, service)
    assert await dlq(db) == []


async def _quiet(db) -> None:
    await until(lambda: db.fetchval('SELECT count(*) = 0 FROM pgmq."q_device_tasks"'), timeout=60, interval=0.05,
                what="queue empty")


def _read(path: Path) -> dict[str, str]:
    try:
        return json.loads(path.read_text() or "{}")
    except FileNotFoundError:
        return {}


def _write(path: Path, data: dict[str, str]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)
