"""The one converge operation, for commands and reconciliation repairs alike: read, write only what
differs, read back and judge; each device call under its own deadline, and before each write and the
read-back the device claim is asked. On a scripted device, without Postgres."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping

import pytest

from agent.drivers.base import DriverContext
from agent.drivers.registry import Drivers
from agent.errors import AgentError, NoAnswerError, PermanentError, TransientError
from agent.executor.converge import (
    Calls,
    ClaimShort,
    Observation,
    VerifyError,
    call_timeout,
    converge,
    converge_one,
)
from agent.executor.deadlines import Deadlines
from agent.executor.policy import RetryPolicy
from agent.model.device import Device, State
from agent.reconcile.worker import ReconcileTuning, SyncWorker, _Parked
from tests.support.devices import BatchDriver, ScriptedDriver

R1 = Device("r1", "scripted")


@pytest.fixture
async def deadlines() -> AsyncIterator[Deadlines]:
    deadlines = Deadlines(resolution=0.01)
    sweeper = asyncio.create_task(deadlines.run())
    yield deadlines
    sweeper.cancel()


class Claim:
    """The device claim as the operation sees it: covers calls until `lost_after` answers, and notes
    the seconds each call asked it to cover."""

    def __init__(self, lost_after: int | None = None) -> None:
        self.asked: list[float] = []
        self._lost_after = lost_after

    async def __call__(self, seconds: float) -> bool:
        self.asked.append(seconds)
        return self._lost_after is None or len(self.asked) <= self._lost_after


def ops(driver: ScriptedDriver) -> list[tuple[str, str]]:
    return [(c.op, c.service) for c in driver.calls]


async def test_only_the_services_that_differ_are_written_and_only_they_are_read_back(deadlines):
    driver = ScriptedDriver(states={("r1", "tv"): "on"})
    done = await converge(driver, R1, ["tv", "wifi"], Calls(1.0, deadlines), {"tv": "on", "wifi": "on"})
    assert ops(driver) == [("read", "tv"), ("read", "wifi"), ("apply", "wifi"), ("read", "wifi")]
    tv, wifi = done["tv"].proof(), done["wifi"].proof()
    assert isinstance(tv, Observation) and tv.applied_at is None and tv.verified_at == tv.observed_at
    assert isinstance(wifi, Observation) and wifi.observed == "on" and wifi.applied_at is not None


async def test_a_driver_that_reads_many_is_read_once_before_and_once_after(deadlines):
    driver = BatchDriver()
    done = await converge(driver, R1, ["a", "b", "c"], Calls(1.0, deadlines), {"a": "on", "b": "off", "c": "on"})
    assert ops(driver) == [("read_many", "a,b,c"), ("apply", "a"), ("apply", "c"), ("read_many", "a,c")]
    assert all(isinstance(d.proof(), Observation) for d in done.values())


async def test_a_repair_reads_and_writes_its_one_service_call_by_call(deadlines):
    driver = BatchDriver()
    proof = await converge_one(driver, R1, "wifi", "on", Calls(1.0, deadlines))
    assert ops(driver) == [("read", "wifi"), ("apply", "wifi"), ("read", "wifi")]
    assert proof.observed == "on" and proof.applied_at is not None


async def test_a_read_back_that_differs_is_a_verify_error_not_a_success(deadlines):
    driver = ScriptedDriver()
    driver.lie("r1", "wifi")  # answers the write OK, changes nothing
    done = await converge(driver, R1, ["wifi"], Calls(1.0, deadlines), {"wifi": "on"})
    proof = done["wifi"].proof()
    assert isinstance(proof, VerifyError) and proof.observed == "off" and proof.applied_at == done["wifi"].applied
    assert "wrote 'on' to wifi on r1, read back 'off'" in str(proof)
    with pytest.raises(VerifyError):
        driver.lie("r1", "wifi")
        await converge_one(driver, R1, "wifi", "on", Calls(1.0, deadlines))


async def test_a_write_the_device_fails_is_that_services_error_and_is_not_read_back(deadlines):
    driver = ScriptedDriver()
    driver.fail("r1", "voip", TransientError("r1: busy"))
    done = await converge(driver, R1, ["voip", "wifi"], Calls(1.0, deadlines), {"voip": "on", "wifi": "on"})
    assert str(done["voip"].proof()) == "r1: busy" and done["voip"].after is None
    assert isinstance(done["wifi"].proof(), Observation)  # the others go on
    assert ops(driver)[-1] == ("read", "wifi")
    driver.fail("r1", "voip", PermanentError("r1: no such secret"))
    with pytest.raises(PermanentError, match="no such secret"):
        await converge_one(driver, R1, "voip", "on", Calls(1.0, deadlines))


async def test_a_service_whose_first_read_fails_is_not_written(deadlines):
    driver = ScriptedDriver()
    driver.fail("r1", "wifi", TransientError("r1: connection reset"), on="read")
    done = await converge(driver, R1, ["wifi"], Calls(1.0, deadlines), {"wifi": "on"})
    assert str(done["wifi"].proof()) == "r1: connection reset" and driver.writes("r1", "wifi") == []


async def test_a_claim_lost_before_the_write_means_no_write(deadlines):
    driver, claim = ScriptedDriver(), Claim(lost_after=0)
    done = await converge(driver, R1, ["wifi"], Calls(1.0, deadlines, claim), {"wifi": "on"})
    assert driver.writes("r1", "wifi") == [] and isinstance(done["wifi"].proof(), ClaimShort)
    assert "claim ran short before the write" in str(done["wifi"].proof())
    with pytest.raises(ClaimShort):  # a repair gets it too, and its caller parks rather than retries
        await converge_one(driver, R1, "wifi", "on", Calls(1.0, deadlines, Claim(lost_after=0)))
    assert driver.writes("r1", "wifi") == []


async def test_a_claim_lost_after_the_write_is_not_read_back_and_says_so(deadlines):
    driver, claim = ScriptedDriver(), Claim(lost_after=1)
    done = await converge(driver, R1, ["wifi"], Calls(1.0, deadlines, claim), {"wifi": "on"})
    assert ops(driver) == [("read", "wifi"), ("apply", "wifi")]
    assert isinstance(done["wifi"].applied, float) and "before the read-back" in str(done["wifi"].proof())


async def test_the_claim_is_asked_before_each_write_and_the_read_back_for_that_call(deadlines):
    paced = Device("r1", "scripted", options={"max_rate": 10, "max_parallel": 2})
    driver, claim = ScriptedDriver(), Claim()
    calls = Calls.of(paced, 1.0, deadlines, claim)
    await converge(driver, paced, ["a", "b"], calls, {"a": "on", "b": "on"})
    assert len(claim.asked) == 3  # two writes, one read-back
    assert claim.asked[0] == calls.need(1.0) > 1.0 + 2 * calls.turn  # the call, its turns in max_rate, a margin


async def test_every_device_call_has_a_deadline_of_its_own(deadlines):
    class SlowWrite(ScriptedDriver):
        async def apply(self, device: Device, service: str, state: State) -> None:
            await asyncio.sleep(0.5)  # the read was quick: the time left of a whole operation does not count
            await super().apply(device, service, state)

    driver = SlowWrite()
    with pytest.raises(NoAnswerError, match=r"apply on r1 timed out \(0.3s per call\)"):
        await converge_one(driver, R1, "wifi", "on", Calls(0.3, deadlines))


async def test_a_device_with_a_longer_timeout_of_its_own_gets_it_per_call():
    assert call_timeout(Device("r1", "http", options={"timeout": 30}), 10.0) == 31.0
    assert call_timeout(R1, 10.0) == 10.0
    assert Calls.of(Device("r1", "http", options={"timeout": 30}), 10.0, Deadlines()).timeout == 31.0


async def test_nothing_is_written_before_the_desired_states_are_known_and_only_those(deadlines):
    driver, seen = ScriptedDriver(), []

    async def accepted() -> Mapping[str, State]:  # a take's acceptance, answering after the read
        seen.append(list(ops(driver)))
        return {"b": "on"}  # a is superseded: not written

    done = await converge(driver, R1, ["a", "b"], Calls(1.0, deadlines), accepted)
    assert seen == [[("read", "a"), ("read", "b")]]
    assert driver.writes("r1", "a") == [] and driver.writes("r1", "b") == ["on"] and list(done) == ["b"]


async def test_once_urgent_no_further_write_starts_and_the_rest_are_left(deadlines):
    driver = ScriptedDriver()
    want: dict[str, State] = {"a": "on", "b": "on", "c": "on"}
    done = await converge(driver, R1, list(want), Calls(1.0, deadlines), want, urgent=lambda: True)
    assert ops(driver) == [("read", "a"), ("read", "b"), ("read", "c"), ("apply", "a"), ("read", "a")]
    assert [s for s, d in done.items() if d.left] == ["b", "c"]  # at least one write: a take always progresses


async def test_a_driver_that_writes_many_at_once_gets_one_call_bounded_like_the_writes_it_replaces(deadlines):
    class Policy(ScriptedDriver):
        async def apply_many(self, device: Device, wanted: Mapping[str, State]) -> dict[str, AgentError | None]:
            await self._call("apply_many", device, ",".join(wanted))
            self.states.update({(device.id, svc): state for svc, state in wanted.items() if svc != "b"})
            return {svc: TransientError("r1: user/b locked") if svc == "b" else None for svc in wanted}

    driver, claim = Policy(), Claim()
    many = Device("r1", "scripted", options={"max_parallel": 2})
    done = await converge(driver, many, ["a", "b", "c"], Calls.of(many, 1.0, deadlines, claim),
                          {"a": "on", "b": "on", "c": "on"})
    assert ops(driver)[3] == ("apply_many", "a,b,c") and claim.asked[0] == 2.0 + 2.0  # two rounds of two
    assert str(done["b"].proof()) == "r1: user/b locked" and done["b"].after is None
    assert isinstance(done["a"].proof(), Observation) and isinstance(done["c"].proof(), Observation)
    assert ops(driver)[4:] == [("read", "a"), ("read", "c")]  # what was written is read back


async def test_a_reconcile_repair_whose_claim_runs_short_after_its_reading_parks_and_writes_nothing(deadlines):
    driver, answers = ScriptedDriver(), iter([True])  # the claim covers the reading, then no more
    worker = SyncWorker(None, None, Drivers(DriverContext(), {"scripted": driver}), deadlines,  # type: ignore[arg-type]
                        lambda _d: None, lambda: (RetryPolicy(3, 0.01, 0.01), 1.0), ReconcileTuning(),
                        may_operate=lambda _d: next(answers, False))
    with pytest.raises(_Parked, match="claim on the device ran short"):
        await worker._converge(driver, R1, "wifi", "on")
    assert ops(driver) == [("read", "wifi")]
