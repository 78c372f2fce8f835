"""AGENT_ARCHIVE=false: a settled message is deleted instead of archived (one row fewer written per
command); what happened to it stays in agent.events, and dead letters still reach the DLQ."""

from __future__ import annotations

from agent.errors import PermanentError
from tests.support.agents import running_agent
from tests.support.db import add_device, dlq, events, queue_len, send, state
from tests.support.devices import ScriptedDriver
from tests.support.wait import until


async def test_settled_messages_leave_no_archive_row_and_keep_their_audit(db, dsn):
    await add_device(db, "r1")
    driver = ScriptedDriver()
    driver.fail("r1", "voip", PermanentError("no such service"))
    async with running_agent(dsn, driver, archive=False):
        ok = await send(db, {"device": "r1", "service": "wifi", "state": "on", "request_id": "inv-42"})
        bad = await send(db, {"device": "r1", "service": "voip", "state": "on"})
        await until(lambda: _settled(db), what="both settled")
    assert await db.fetchval('SELECT count(*) FROM pgmq."a_device_tasks"') == 0
    assert await events(db, ok) == ["verified"]
    assert (await state(db, "r1", "wifi"))["observed"] == "on"
    assert [d["message"]["service"] for d in await dlq(db)] == ["voip"]
    assert "dead_lettered" in await events(db, bad)


async def _settled(db) -> bool:
    return await queue_len(db) == 0 and len(await dlq(db)) == 1 and "verified" in await events(db)
