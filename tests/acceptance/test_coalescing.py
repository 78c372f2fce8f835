"""Coalesced takes with the real agentd: a crash between the batch write and the report loses
nothing, and the next delivery finds the device done."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from tests.support.agents import spawn_agentd
from tests.support.db import add_device, archived, events, send, state, writes
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
        assert await events(db, msg) == ["verified"] and await writes(db, msg) == []  # found done: not written again
        assert (await state(db, "r1", s))["observed"] == "on"


async def _once(dsn: str) -> None:
    """agentd --once: everything waiting is read together, so each device's commands form one take."""
    proc = spawn_agentd(dsn, "--once")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out


async def _sim(db, tmp_path: Path, initial: str) -> Path:
    path = tmp_path / "s1.json"
    await add_device(db, "s1", "sim", {"state_file": str(path), "initial": initial})
    return path


def _set(state: str, request_id: str, **extra: str) -> dict[str, str]:
    return {"device": "s1", "service": "pppoe:alice", "state": state, "request_id": request_id, **extra}


async def test_a_resent_old_suspend_in_a_take_does_not_undo_the_payment_after_it(db, dsn, tmp_path):
    """The account was suspended long ago; while its commands wait, the customer pays and the
    billing webhook resends the old suspend. The resend is a duplicate and changes nothing: the
    payment, the newest command accepted, is applied — as if they had run one at a time."""
    sim = await _sim(db, tmp_path, "on")
    suspend = await send(db, _set("off", "suspend-42"))
    await _once(dsn)
    assert _file(sim) == {"pppoe:alice": "off"}
    paid = await send(db, _set("on", "paid-42"))
    resent = await send(db, _set("off", "suspend-42"))
    await _once(dsn)
    assert await events(db, paid) == ["verified"]
    assert await events(db, resent) == ["duplicate"]
    assert _file(sim) == {"pppoe:alice": "on"}
    row = await state(db, "s1", "pppoe:alice")
    assert (row["desired"], row["desired_version"], row["observed"]) == ("on", paid, "on")
    assert suspend < paid < resent


async def test_a_resent_payment_after_a_refund_in_one_take_does_not_bring_the_service_back(db, dsn, tmp_path):
    """on (pay-1), off (refund-1), then pay-1 again from a webhook retry, all waiting together: the
    retry is a duplicate of the first, so the refund is the newest accepted command and wins."""
    sim = await _sim(db, tmp_path, "on")
    pay = await send(db, _set("on", "pay-1"))
    refund = await send(db, _set("off", "refund-1"))
    retry = await send(db, _set("on", "pay-1"))
    await _once(dsn)
    assert await events(db, pay) == ["superseded"]
    assert await events(db, refund) == ["verified"]
    assert await events(db, retry) == ["duplicate"]
    assert _file(sim) == {"pppoe:alice": "off"}
    row = await state(db, "s1", "pppoe:alice")
    assert (row["desired"], row["desired_version"], row["observed"]) == ("off", refund, "off")
    assert await db.fetchval("SELECT version FROM agent.requests WHERE request_id = 'pay-1'") == pay


async def test_an_expired_newest_command_in_a_take_leaves_the_one_before_it_in_force(db, dsn, tmp_path):
    """A suspend whose not_after passed before it ran is expired, never accepted: the payment before
    it in the same take is the newest accepted command, and it is applied."""
    sim = await _sim(db, tmp_path, "off")
    paid = await send(db, _set("on", "paid-42"))
    late = await send(db, _set("off", "grace-42", not_after="2020-01-01T00:00:00Z"))
    await _once(dsn)
    assert await events(db, paid) == ["verified"]
    assert await events(db, late) == ["expired"]
    assert _file(sim) == {"pppoe:alice": "on"}
    row = await state(db, "s1", "pppoe:alice")
    assert (row["desired"], row["desired_version"]) == ("on", paid)
