"""A reconcile reads a device's services in one request where the driver can (`read_many`): a router
with many services in sync is one call, not one per service kept apart by the pace while the
commands behind the reconcile wait in the device's lane."""

from __future__ import annotations

from agent.errors import TransientError
from tests.support.agents import running_agent
from tests.support.db import add_device
from tests.support.devices import BatchDriver, ScriptedDriver
from tests.support.wait import until

SERVICES = [f"s{i:02}" for i in range(30)]


async def reconcile(db, agent, device: str) -> dict:
    await until(lambda: agent.leadership.leading, timeout=15, what="leader elected")
    run = await db.fetchval("SELECT agent.request_sync('default', $1)", device)
    await until(lambda: db.fetchval("SELECT finished_at IS NOT NULL FROM agent.sync_runs WHERE id = $1", run),
                timeout=20, what="the reconcile run finished")
    return dict(await db.fetchrow("SELECT checked, in_sync, drifted, repaired, unreadable FROM agent.sync_runs "
                                  "WHERE id = $1", run))


async def desired_on(db, device: ScriptedDriver, drifted: set[str] = frozenset(),
                     services: list[str] = SERVICES) -> None:
    await add_device(db, "r1", "batch")
    await db.executemany("INSERT INTO agent.service_state (device, service, desired, observed) "
                         "VALUES ('r1', $1, 'on', 'on')", [(s,) for s in services])
    for s in services:
        device.states[("r1", s)] = "off" if s in drifted else "on"


async def test_a_device_in_sync_is_reconciled_with_one_read(db, dsn):
    device = BatchDriver(name="batch")
    await desired_on(db, device)
    async with running_agent(dsn, device, reconcile_pace=5.0) as agent:  # 30 paced reads would take 145 s
        found = await reconcile(db, agent, "r1")
    assert found == {"checked": 30, "in_sync": 30, "drifted": 0, "repaired": 0, "unreadable": 0}
    assert [c.op for c in device.calls] == ["read_many"]


async def test_a_device_with_more_services_than_one_request_reads_is_read_in_bounded_requests(db, dsn):
    """Each request under its own deadline: 250 services are three requests, not one that must
    answer for all of them within one device timeout."""
    many = [f"p{i:03}" for i in range(250)]
    device = BatchDriver(name="batch")
    await desired_on(db, device, services=many)
    async with running_agent(dsn, device, reconcile_pace=0) as agent:
        found = await reconcile(db, agent, "r1")
    assert found == {"checked": 250, "in_sync": 250, "drifted": 0, "repaired": 0, "unreadable": 0}
    assert [(c.op, len(c.service.split(","))) for c in device.calls] == [("read_many", n) for n in (100, 100, 50)]


async def test_only_what_the_batch_reading_found_drifted_takes_calls_of_its_own(db, dsn):
    device = BatchDriver(name="batch")
    await desired_on(db, device, drifted={"s03", "s17"})
    async with running_agent(dsn, device, reconcile_pace=0.1) as agent:
        found = await reconcile(db, agent, "r1")
    assert found == {"checked": 30, "in_sync": 28, "drifted": 2, "repaired": 2, "unreadable": 0}
    assert [(c.op, c.service) for c in device.calls[1:]] == [
        ("read", "s03"), ("apply", "s03"), ("read", "s03"), ("read", "s17"), ("apply", "s17"), ("read", "s17")]
    assert device.calls[0].op == "read_many" and device.states[("r1", "s03")] == "on"


async def test_a_batch_reading_that_keeps_failing_leaves_every_service_unreadable(db, dsn):
    device = BatchDriver(name="batch")
    device.fail_reads("r1", TransientError("r1: connection refused"), times=10)
    await desired_on(db, device)
    async with running_agent(dsn, device, reconcile_pace=0.1, max_attempts=2) as agent:
        found = await reconcile(db, agent, "r1")
    assert found == {"checked": 30, "in_sync": 0, "drifted": 0, "repaired": 0, "unreadable": 30}
    assert [c.op for c in device.calls] == ["read_many", "read_many"]  # its retries, no call per service
    errors = await db.fetch("SELECT DISTINCT error FROM agent.events WHERE kind = 'unreadable'")
    assert [r["error"] for r in errors] == ["r1: connection refused"]


class PolicyDriver(ScriptedDriver):
    """A device whose suspension policy is half missing: the list of the `blocked:` services is used
    by no enabled firewall rule (as the routeros driver's check_policy would find)."""

    def __init__(self) -> None:
        super().__init__(name="policied")
        self.asked: list[list[str]] = []

    async def check_policy(self, device, services):  # type: ignore[no-untyped-def]
        self.asked.append(sorted(services))
        return [f"address list {s.split(':', 1)[1]!r} is used by no enabled firewall rule: suspending "
                "through it blocks nobody" for s in sorted(services) if s.startswith("blocked:")]


async def test_a_reconcile_run_records_each_suspension_policy_that_blocks_nobody(db, dsn):
    device = PolicyDriver()
    await add_device(db, "r1", "policied")
    await db.executemany("INSERT INTO agent.service_state (device, service, desired, observed) "
                         "VALUES ('r1', $1, 'off', 'off')", [("blocked:unpaid",), ("blocked:late",), ("wifi",)])
    for s in ("blocked:unpaid", "blocked:late", "wifi"):
        device.states[("r1", s)] = "off"
    async with running_agent(dsn, device) as agent:
        found = await reconcile(db, agent, "r1")
        counted = agent.metrics.policy_missing._value.get()  # type: ignore[attr-defined]
    assert found["in_sync"] == 3
    assert device.asked == [["blocked:late", "blocked:unpaid", "wifi"]]
    rows = await db.fetch("SELECT device, service, error FROM agent.events WHERE kind = 'policy_missing' ORDER BY id")
    assert [(r["device"], r["service"]) for r in rows] == [("r1", None), ("r1", None)]
    assert ["'late'" in rows[0]["error"], "'unpaid'" in rows[1]["error"]] == [True, True]
    assert counted == 2
