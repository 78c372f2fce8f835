"""Restores first, in a device's lane: a take of suspensions yields to a restore that arrives while it
writes (after the write under way, before the next), and a reconcile run lets it through between
two services it checks; the run's counts are those of one whole pass."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from agent.executor.executor import Work
from agent.model.device import Device
from tests.support.agents import running_agent
from tests.support.db import add_device, archived, events, send
from tests.support.devices import BatchDriver
from tests.support.wait import until


@dataclass
class HeldDriver(BatchDriver):
    """Its first write waits until the test lets it go."""

    held: asyncio.Event = field(default_factory=asyncio.Event)
    go: asyncio.Event = field(default_factory=asyncio.Event)

    async def apply(self, device: Device, service: str, state) -> None:  # type: ignore[no-untyped-def]
        if not self.held.is_set():
            self.held.set()
            await self.go.wait()
        await super().apply(device, service, state)

    def applied(self) -> list[str]:
        return [c.service for c in self.calls if c.op == "apply"]


def in_lane(agent, device: str, msg_id: int) -> bool:  # type: ignore[no-untyped-def]
    return any(isinstance(it, Work) and it.delivery.msg_id == msg_id
               for it in agent.executor._lanes.get(device, ()))


async def all_archived(db, ids: list[int]) -> bool:  # type: ignore[no-untyped-def]
    return all([await archived(db, i) for i in ids])


async def test_a_take_of_suspensions_yields_to_a_restore_between_two_writes(db, dsn):
    await add_device(db, "r1")
    device = HeldDriver()
    services = [f"s{i}" for i in range(6)]
    for svc in services:
        device.states[("r1", svc)] = "on"
    offs = [await send(db, {"device": "r1", "service": svc, "state": "off"}) for svc in services]
    async with running_agent(dsn, device) as agent:  # the six suspensions are one take
        await until(lambda: device.held.is_set(), what="the take's first write under way")
        restore = await send(db, {"device": "r1", "service": "x", "state": "on"})
        await until(lambda: in_lane(agent, "r1", restore), what="the restore waiting in the lane")
        device.go.set()
        await until(lambda: all_archived(db, [*offs, restore]), what="all settled")
    assert device.applied() == ["s0", "x", "s1", "s2", "s3", "s4", "s5"]
    assert await events(db, restore) == ["verified"]
    for msg in offs:  # the ones the take gave back were taken again: written once, verified
        assert await events(db, msg) == ["verified"]
    assert all(device.writes("r1", svc) == ["off"] for svc in services)


async def test_a_suspension_sent_with_priority_high_overtakes_too(db, dsn):
    await add_device(db, "r1")
    device = HeldDriver()
    for svc in ("a", "b", "c", "urgent"):
        device.states[("r1", svc)] = "on"
    offs = [await send(db, {"device": "r1", "service": svc, "state": "off"}) for svc in ("a", "b", "c")]
    async with running_agent(dsn, device) as agent:
        await until(lambda: device.held.is_set(), what="the take's first write under way")
        urgent = await send(db, {"device": "r1", "service": "urgent", "state": "off"}, headers={"priority": "high"})
        await until(lambda: in_lane(agent, "r1", urgent), what="the urgent command waiting in the lane")
        device.go.set()
        await until(lambda: all_archived(db, [*offs, urgent]), what="all settled")
    assert device.applied() == ["a", "urgent", "b", "c"]


async def test_a_reconcile_run_lets_a_restore_through_between_two_services_and_counts_every_service(db, dsn):
    await add_device(db, "r1")
    device = HeldDriver()
    drifted = [f"s{i:02}" for i in range(8)]
    await db.executemany("INSERT INTO agent.service_state (device, service, desired, observed) "
                         "VALUES ('r1', $1, 'on', 'on')", [(s,) for s in drifted])
    for svc in drifted:
        device.states[("r1", svc)] = "off"  # all drifted: the run repairs every one
    async with running_agent(dsn, device, reconcile_pace=0) as agent:
        await until(lambda: agent.leadership.leading, timeout=15, what="leader elected")
        run = await db.fetchval("SELECT agent.request_sync('default', 'r1')")
        await until(lambda: device.held.is_set(), what="the run's first repair under way")
        restore = await send(db, {"device": "r1", "service": "x", "state": "on"})
        await until(lambda: in_lane(agent, "r1", restore), what="the restore waiting behind the reconcile")
        device.go.set()
        await until(lambda: db.fetchval("SELECT finished_at IS NOT NULL FROM agent.sync_runs WHERE id = $1", run),
                    timeout=30, what="the run finished")
        await until(lambda: archived(db, restore), what="the restore settled")
    assert device.applied() == ["s00", "x", *drifted[1:]]
    found = await db.fetchrow("SELECT checked, in_sync, drifted, repaired, unreadable, failed FROM agent.sync_runs "
                              "WHERE id = $1", run)
    assert dict(found) == {"checked": 8, "in_sync": 0, "drifted": 8, "repaired": 8, "unreadable": 0, "failed": 0}


async def test_a_command_that_ran_in_the_middle_of_a_run_is_judged_by_its_new_desired_state(db, dsn):
    """A suspension for a service the run has not reached yet: the run checks it against `off` (in
    sync after the command), never turns it back on."""
    await add_device(db, "r1")
    device = HeldDriver()
    drifted = [f"s{i:02}" for i in range(4)]
    await db.executemany("INSERT INTO agent.service_state (device, service, desired, observed) "
                         "VALUES ('r1', $1, 'on', 'on')", [(s,) for s in drifted])
    for svc in drifted:
        device.states[("r1", svc)] = "off"
    async with running_agent(dsn, device, reconcile_pace=0) as agent:
        await until(lambda: agent.leadership.leading, timeout=15, what="leader elected")
        run = await db.fetchval("SELECT agent.request_sync('default', 'r1')")
        await until(lambda: device.held.is_set(), what="the run's first repair under way")
        cut = await send(db, {"device": "r1", "service": "s03", "state": "off"})
        await until(lambda: in_lane(agent, "r1", cut), what="the suspension waiting behind the reconcile")
        device.go.set()
        await until(lambda: db.fetchval("SELECT finished_at IS NOT NULL FROM agent.sync_runs WHERE id = $1", run),
                    timeout=30, what="the run finished")
        await until(lambda: archived(db, cut), what="the suspension settled")
    assert device.states[("r1", "s03")] == "off" and device.writes("r1", "s03") == []
    found = await db.fetchrow("SELECT checked, in_sync, repaired FROM agent.sync_runs WHERE id = $1", run)
    assert dict(found) == {"checked": 4, "in_sync": 1, "repaired": 3}
