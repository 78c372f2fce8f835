"""Coalesced takes with the real agentd: a crash between the batch write and the report loses
nothing, and the next delivery finds the device done."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from tests.support.agents import spawn_agentd
from tests.support.db import add_device, archived, events, send, state
from tests.support.wait import until

pytestmark = pytest.mark.acceptance


def _file(path: Path) -> dict[str, str]:
    try:
        return json.loads(path.read_text() or "{}")
    except (FileNotFoundError, ValueError):
        return {}


async def test_a_crash_between_the_batch_write_and_the_report_loses_nothing(db, dsn, tmp_path):
    sim = tmp_path / "r1.json"
    await add_device(db, "r1", "sim", {"latency": 0.5, "state_file": str(sim)})
    services = ["a", "b", "c"]
    ids = [await send(db, {"device": "r1", "service": s, "state": "on"}) for s in services]
    proc = spawn_agentd(dsn, visibility_timeout=2, poll_interval=1)
    try:  # one read (0.5 s), three writes (1.5 s), then the read-back is under way
        await until(lambda: _file(sim) == dict.fromkeys(services, "on"), timeout=15, what="all three written")
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        proc.kill()
        proc.communicate()
    assert not any([await archived(db, i) for i in ids])
    for s in services:  # intent recorded before the device was touched, outcome not yet
        row = await state(db, "r1", s)
        assert (row["desired"], row["verified_at"]) == ("on", None)
    await until(lambda: db.fetchval('SELECT bool_and(vt <= clock_timestamp()) FROM pgmq."q_device_tasks"'),
                timeout=10, what="leases of the dead daemon ran out")
    code = spawn_agentd(dsn, "--once")
    out, _ = code.communicate(timeout=60)
    assert code.returncode == 0, out
    for msg, s in zip(ids, services):
        assert await archived(db, msg)
        assert await events(db, msg) == ["verified"]  # found done: no "applied", not written a second time
        assert (await state(db, "r1", s))["observed"] == "on"
