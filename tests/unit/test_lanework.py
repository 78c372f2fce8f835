"""One registry of lane work: the composition root registers the kinds (reconcile messages, then
commands); the consumer asks it which kind a message is, the executor asks an item's kind how to run
it. A new kind is registered without touching either."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, ClassVar

import pytest
from pydantic import BaseModel, ValidationError

from agent.contract import Command
from agent.db.queries import Queries
from agent.errors import PermanentError
from agent.executor.commands import Commands, Work
from agent.executor.executor import Executor
from agent.executor.lanework import NOT_RECOGNISED, LaneWork, LaneWorks
from agent.executor.policy import RetryPolicy, Tuning
from agent.model.device import Device
from agent.model.outcome import Delivery, Outcome
from agent.model.sites import Elsewhere
from agent.queue.consumer import Consumer
from agent.reconcile.messages import ReconcileMessages
from agent.reconcile.worker import ReconcileTuning, SyncWork, SyncWorker
from agent.settings import load_settings
from tests.support.wait import until

T0 = datetime(2026, 11, 30, 23, 59, tzinfo=timezone.utc)
POLICY = RetryPolicy(3, 1.0, 5.0)


async def _never(_item: Any) -> Outcome:
    raise AssertionError("not run in these tests")


def commands() -> Commands:
    return Commands(_never, lambda w, exc: Outcome(w.delivery, "retry", retry_delay=1.0))


def reconciles() -> ReconcileMessages:
    worker = SyncWorker(None, None, None, None, lambda _dev: None,  # type: ignore[arg-type]
                        lambda: (POLICY, 10.0), ReconcileTuning())
    return ReconcileMessages(worker)


def registry(*more: LaneWork) -> LaneWorks:
    """As the daemon registers them: reconcile messages, any new kind, commands last."""
    return LaneWorks(reconciles(), *more, commands())


# -- a kind of lane work the agent does not have: what a new one takes ------------------------------

class Batch(BaseModel):
    device: str
    services: list[str]


@dataclass
class BatchWork:
    delivery: Delivery
    batch: Batch
    device: Device
    kind: LaneWork
    joins_take: ClassVar[bool] = False
    high: ClassVar[bool] = False
    service: ClassVar[str | None] = None

    @property
    def identities(self) -> dict[str, Any]:
        return {"device": self.device.id, "msg_id": self.delivery.msg_id}


class Batches:
    name = "batch"
    reconcile = False
    overtakes = False
    reroutes = False

    def __init__(self, overtakes: bool = False) -> None:
        self.overtakes = overtakes
        self.ran: list[int] = []
        self.broken = False

    def recognises(self, raw: str | None) -> bool:
        return raw is not None and raw.startswith('{"batch"')

    def parse(self, delivery: Delivery, raw: str | None) -> Batch:
        try:
            return Batch.model_validate(json.loads(raw or "")["batch"])
        except ValidationError as exc:
            raise PermanentError(f"invalid batch: {exc.errors()[0]['loc'][0]} {exc.errors()[0]['msg']}") from None

    def item(self, delivery: Delivery, body: Batch, device: Device) -> BatchWork:
        return BatchWork(delivery, body, device, self)

    def unknown_device(self, delivery: Delivery, body: Batch, why: str) -> Outcome:
        return Outcome(delivery, "archive", reason=f"batch not run: {why}")

    async def run(self, item: BatchWork) -> Outcome:
        if self.broken:
            raise RuntimeError("a bug in the batch")
        self.ran.append(item.delivery.msg_id)
        return Outcome(item.delivery, "archive")

    def internal_error(self, item: BatchWork, exc: Exception) -> Outcome:
        return Outcome(item.delivery, "retry", retry_delay=7.0, reason=f"batch broke: {exc}")


def delivery(msg_id: int, body: str) -> Delivery:
    return Delivery(msg_id, 1, T0, body, None, msg_id)


# -- the registry ----------------------------------------------------------------------------------

def test_a_message_is_the_kind_of_the_first_registered_kind_that_recognises_it():
    kinds = registry(Batches())
    assert kinds.recognise('{"reconcile": {"run": 1, "device": "r1"}}').name == "reconcile"
    assert kinds.recognise('{"batch": {"device": "r1", "services": []}}').name == "batch"
    assert kinds.recognise('{"device": "r1", "service": "wifi", "state": "on"}').name == "command"
    assert kinds.recognise('{"batch": {}}') is not kinds.recognise('{"device": "r1"}')


def test_commands_take_whatever_no_kind_before_them_claims_and_the_contract_judges_it():
    kinds, body = registry(), '{"device": "r1", "service": "wifi", "state": "on", "batch": 1}'
    kind = kinds.recognise(body)  # no kind of batches is registered here
    assert kind.name == "command"
    with pytest.raises(PermanentError, match="invalid command: batch: Extra inputs are not permitted"):
        kind.parse(delivery(1, body), body)
    sync = '{"reconcile": {"device": "r1"}}'
    with pytest.raises(PermanentError, match=r"invalid reconcile message: reconcile\.run"):
        kinds.recognise(sync).parse(delivery(1, sync), sync)


def test_a_message_no_kind_recognises_is_refused_with_the_reason():
    with pytest.raises(PermanentError, match=f"{NOT_RECOGNISED} \\(known: reconcile, batch\\)"):
        LaneWorks(reconciles(), Batches()).recognise('{"device": "r1", "service": "wifi", "state": "on"}')


def test_a_kind_is_registered_once():
    with pytest.raises(ValueError, match="'command' is registered already"):
        LaneWorks(commands(), commands())


def test_each_kind_makes_its_own_lane_item_which_answers_what_the_executor_asks():
    dev, d = Device("r1", "sim"), delivery(5, "{}")
    restore = commands().item(d, Command(device="r1", service="wifi", state="on"), dev)
    refresh = commands().item(d, Command(device="r1", service="wifi", action="refresh"), dev)
    sync = reconciles().parse(d, '{"reconcile": {"run": 1, "device": "r1"}}')
    run = reconciles().item(d, sync, dev)
    assert isinstance(restore, Work) and isinstance(run, SyncWork)
    assert (restore.joins_take, restore.high) == (True, True)
    assert (restore.kind.overtakes, restore.kind.reconcile) == (True, False)
    assert (refresh.joins_take, refresh.high) == (False, False)
    assert (run.joins_take, run.high, run.kind.overtakes, run.kind.reconcile) == (False, False, False, True)
    assert restore.identities == {"device": "r1", "service": "wifi", "msg_id": 5, "request_id": None}
    assert run.identities == {"device": "r1", "msg_id": 5}


def test_what_becomes_of_a_message_whose_device_is_not_here_is_its_kinds_to_say():
    d = delivery(5, "{}")
    cmd = commands().unknown_device(d, Command(device="gone", service="wifi", state="on"), "unknown device 'gone'")
    assert (cmd.finish, cmd.reason, cmd.events[0].kind, cmd.events[0].device) == (
        "dead_letter", "unknown device 'gone'", "dead_lettered", "gone")
    sync = reconciles().parse(d, '{"reconcile": {"run": 3, "device": "gone"}}')
    run = reconciles().unknown_device(d, sync, "unknown device 'gone'")
    assert (run.finish, run.reconcile, run.sync["run"], run.sync["skipped"]) == (
        "archive", True, 3, "unknown device 'gone'")


def test_a_reconcile_message_that_broke_is_retried_with_the_policys_backoff():
    d = Delivery(5, 2, T0, "{}", None, 5)
    run = reconciles().item(d, reconciles().parse(d, '{"reconcile": {"run": 3, "device": "r1"}}'), Device("r1", "sim"))
    out = run.kind.internal_error(run, RuntimeError("bug"))
    assert (out.finish, out.reconcile) == ("retry", True)
    assert 1.0 <= out.retry_delay <= 2.0  # the second attempt's backoff: half of 2 s fixed, half random


# -- the consumer asks the registry: a new kind needs nothing of it -----------------------------------

class Inventory:
    def __init__(self, here: list[str], elsewhere: dict[str, Elsewhere] | None = None) -> None:
        self.devices = {d: Device(d, "sim") for d in here}
        self.broken: dict[str, str] = {}
        self._elsewhere = elsewhere or {}

    def get(self, device_id: str) -> Device | None:
        return self.devices.get(device_id)

    async def look_up(self, device_ids: list[str]) -> dict[str, Elsewhere]:
        return {d: self._elsewhere[d] for d in device_ids if d in self._elsewhere}

    def why_unknown(self, device_id: str) -> str:
        return f"unknown device {device_id!r}"


class Lanes:
    """What the consumer hands the executor."""

    def __init__(self) -> None:
        self.submitted: list[Any] = []
        self.settled: list[Outcome] = []
        self.rejected: list[tuple[int, str]] = []

    def submit(self, item: Any) -> None:
        self.submitted.append(item)

    def settle(self, outcome: Outcome) -> None:
        self.settled.append(outcome)

    def reject(self, d: Delivery, reason: str, command: Command | None = None) -> None:
        self.rejected.append((d.msg_id, reason))


def row(msg_id: int, body: dict[str, Any]) -> dict[str, Any]:
    return {"msg_id": msg_id, "read_ct": 1, "enqueued_at": T0, "message": json.dumps(body), "headers": None,
            "size": None, "headers_size": None, "last_id": None}


def consumer(kinds: LaneWorks, inventory: Inventory, lanes: Lanes) -> Consumer:
    settings = load_settings(None, database_url="postgresql://agent@db/agent")
    return Consumer(None, Queries(settings.queue), settings, lanes, inventory, kinds)  # type: ignore[arg-type]


async def test_a_new_kind_of_lane_work_is_registered_without_touching_the_consumer():
    lanes, batches = Lanes(), Batches()
    c = consumer(registry(batches), Inventory(["r1"]), lanes)
    await c._dispatch([row(1, {"batch": {"device": "r1", "services": ["a", "b"]}}),
                       row(2, {"batch": {"device": "gone", "services": ["a"]}}),
                       row(3, {"batch": {"device": "r1"}})], 0.0)
    [item] = lanes.submitted
    assert isinstance(item, BatchWork) and item.kind is batches and item.batch.services == ["a", "b"]
    assert [(o.delivery.msg_id, o.reason) for o in lanes.settled] == [(2, "batch not run: unknown device 'gone'")]
    assert lanes.rejected == [(3, "invalid batch: services Field required")]  # its reason, dead-lettered


async def test_one_dispatch_for_every_kind_commands_join_their_lanes_first():
    lanes = Lanes()
    c = consumer(registry(Batches()), Inventory(["r1"]), lanes)
    await c._dispatch([row(1, {"reconcile": {"run": 4, "device": "r1"}}),
                       row(2, {"batch": {"device": "r1", "services": []}}),
                       row(3, {"device": "r1", "service": "wifi", "state": "off"}),
                       row(4, {"device": "r1", "service": "voip", "action": "refresh"})], 0.0)
    assert [(it.delivery.msg_id, it.kind.name) for it in lanes.submitted] == [
        (3, "command"), (4, "command"), (1, "reconcile"), (2, "batch")]


async def test_a_message_no_kind_recognises_is_dead_lettered_with_the_reason():
    lanes = Lanes()
    c = consumer(LaneWorks(reconciles()), Inventory(["r1"]), lanes)
    await c._dispatch([row(1, {"device": "r1", "service": "wifi", "state": "on"})], 0.0)
    assert lanes.rejected == [(1, f"{NOT_RECOGNISED} (known: reconcile)")] and not lanes.submitted


async def test_a_body_that_is_no_command_is_dead_lettered_with_the_contracts_reason_as_before():
    lanes = Lanes()
    c = consumer(registry(), Inventory(["r1"]), lanes)
    await c._dispatch([row(1, {"device": "r1", "service": "wifi", "state": "on", "batch": 1}),
                       row(2, {"reconcile": {"run": 0, "device": "r1"}})], 0.0)
    assert lanes.rejected == [(1, "invalid command: batch: Extra inputs are not permitted"),
                              (2, "invalid reconcile message: reconcile.run: Input should be greater than 0")]


async def test_a_device_of_another_site_moves_a_command_and_is_reported_by_a_reconcile_message():
    lanes = Lanes()
    there = Elsewhere("r9", "north", "north_tasks", True)
    c = consumer(registry(), Inventory([], {"r9": there}), lanes)
    await c._dispatch([row(1, {"device": "r9", "service": "wifi", "state": "on"}),
                       row(2, {"reconcile": {"run": 4, "device": "r9"}})], 0.0)
    moved, reported = lanes.settled
    assert (moved.delivery.msg_id, moved.finish, moved.move_to) == (1, "move", "north_tasks")
    assert (reported.delivery.msg_id, reported.finish, reported.sync["skipped"]) == (
        2, "archive", "device 'r9' belongs to site 'north' now")


# -- the executor asks the item's kind ---------------------------------------------------------------

class Reported:
    def __init__(self) -> None:
        self.outcomes: list[Outcome] = []

    def submit(self, outcome: Outcome) -> None:
        self.outcomes.append(outcome)


def executor(reported: Reported) -> Executor:
    return Executor(None, None, reported, Tuning(POLICY, 5.0), 2)  # type: ignore[arg-type]


async def test_the_executor_runs_a_new_kind_in_its_devices_lane_through_the_kind():
    reported, batches = Reported(), Batches()
    ex = executor(reported)
    for n in (1, 2):
        ex.submit(batches.item(delivery(n, "{}"), Batch(device="r1", services=[]), Device("r1", "sim")))
    await until(lambda: len(reported.outcomes) == 2, what="both batches reported")
    assert batches.ran == [1, 2]  # in lane order
    assert [(o.delivery.msg_id, o.device, o.driver) for o in reported.outcomes] == [(1, "r1", "sim"), (2, "r1", "sim")]


async def test_a_bug_in_a_kinds_run_is_settled_by_the_kind_never_stranded():
    reported, batches = Reported(), Batches()
    batches.broken = True
    ex = executor(reported)
    ex.submit(batches.item(delivery(1, "{}"), Batch(device="r1", services=[]), Device("r1", "sim")))
    await until(lambda: reported.outcomes, what="the broken batch reported")
    [out] = reported.outcomes
    assert (out.finish, out.retry_delay, out.reason) == ("retry", 7.0, "batch broke: a bug in the batch")


async def test_long_work_makes_way_only_for_kinds_that_overtake():
    reported, quick, slow = Reported(), Batches(overtakes=True), Batches()
    slow.name = "slow"
    ex = executor(reported)
    dev = Device("r1", "sim")
    gate = asyncio.Event()
    ways: list[set[str]] = []

    async def long_run(item: BatchWork) -> Outcome:
        await gate.wait()
        ways.append(await ex.make_way("r1"))
        return Outcome(item.delivery, "archive")

    slow.run = long_run  # type: ignore[method-assign]
    ex.submit(slow.item(delivery(1, "{}"), Batch(device="r1", services=[]), dev))
    ex.submit(slow.item(delivery(2, "{}"), Batch(device="r1", services=[]), dev))
    ex.submit(quick.item(delivery(3, "{}"), Batch(device="r1", services=[]), dev))
    gate.set()
    await until(lambda: len(reported.outcomes) == 3, what="all three reported")
    assert [o.delivery.msg_id for o in reported.outcomes] == [3, 1, 2]  # 3 overtook 1; 2 waited its turn
    assert quick.ran == [3] and ways == [set(), set()]
