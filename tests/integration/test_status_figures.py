"""What the status tells an operator about recent failures: their cause, not the bookkeeping."""

from __future__ import annotations

from agent.errors import TransientError
from tests.support.agents import running_agent
from tests.support.db import add_device, archived, send
from tests.support.devices import ScriptedDriver
from tests.support.wait import until


async def test_recent_failures_show_their_cause_not_when_they_retry(db, dsn):
    await add_device(db, "r1")
    device = ScriptedDriver()
    device.fail("r1", "wifi", TransientError("router busy: 3 sessions in use"))
    async with running_agent(dsn, device) as agent:
        msg = await send(db, {"device": "r1", "service": "wifi", "state": "on"})
        await until(lambda: archived(db, msg), what="applied after one retry")
        [failure] = agent.house.figures().recent_failures
    assert failure["finish"] == "retry" and failure["device"] == "r1" and failure["service"] == "wifi"
    assert "router busy" in failure["error"] and "retry in" not in failure["error"]
