"""Log volume of reconciliation: a run over 500 devices writes one summary line at INFO, not a line
per device (5,000 devices every 5 minutes would be 1.4 M lines a day)."""

from __future__ import annotations

import logging

from agent.drivers.sim import SimDriver
from tests.support.agents import running_agent
from tests.support.wait import until

DEVICES = 500


async def test_a_reconcile_run_over_500_devices_logs_one_line_at_info(db, dsn, caplog):
    await db.execute("INSERT INTO agent.devices (id, driver) SELECT 'd' || i, 'sim' FROM generate_series(1, $1) i",
                     DEVICES)
    await db.execute("INSERT INTO agent.service_state (device, service, desired, observed) "
                     "SELECT 'd' || i, 'wifi', 'off', 'off' FROM generate_series(1, $1) i", DEVICES)
    caplog.set_level(logging.DEBUG)
    async with running_agent(dsn, SimDriver(), reconcile_batch=100, reconcile_pace=0, concurrency=64) as agent:
        await until(lambda: agent.leadership.leading, timeout=15, what="leader elected")
        caplog.clear()
        run = await db.fetchval("SELECT agent.request_sync('default', NULL, NULL, false, 'manual', 'test')")
        await until(lambda: db.fetchval("SELECT finished_at IS NOT NULL FROM agent.sync_runs WHERE id = $1", run),
                    timeout=120, what="the run finished")
        summary = await until(lambda: [r for r in caplog.records if getattr(r, "action", "") == "reconcile_finished"],
                              timeout=15, what="the run's summary line")
    loud = [r for r in caplog.records if r.levelno >= logging.INFO and r.name.startswith("agent.reconcile")]
    assert [r.getMessage() for r in loud] == [summary[0].getMessage()]
    assert summary[0].levelno == logging.INFO and f"{DEVICES} device(s)" in summary[0].getMessage()
    assert f"{DEVICES} in sync" in summary[0].getMessage()
    per_device = [r for r in caplog.records if getattr(r, "action", "") == "reconciled"]
    assert len(per_device) == DEVICES and {r.levelno for r in per_device} == {logging.DEBUG}
