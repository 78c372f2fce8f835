"""Reconcile messages as lane work: one device of a sync run, fed by the site's leader
(agent/reconcile/reconciler.py), run in the device's lane by the worker (agent/reconcile/worker.py).

Recognised by their one key (`{"reconcile": ...}`) and registered before commands. A reconcile
message for a device this site does not have (removed since the run was asked for, or moved to
another site, whose own runs check it) is not moved: it is reported not checked, and the run goes on.
"""

from __future__ import annotations

from agent.model.device import Device
from agent.model.outcome import Delivery, Outcome
from agent.reconcile.request import SyncRequest, is_sync, parse_sync
from agent.reconcile.worker import SyncWork, SyncWorker, unknown_device


class ReconcileMessages:
    """The kind of lane work a reconcile message is."""

    name = "reconcile"
    reconcile = True
    overtakes = False  # long work: it makes way for the commands behind it (Executor.make_way)
    reroutes = False

    def __init__(self, worker: SyncWorker) -> None:
        self._worker = worker

    def recognises(self, raw: str | None) -> bool:
        return is_sync(raw)

    def parse(self, delivery: Delivery, raw: str | None) -> SyncRequest:
        return parse_sync(raw or "")

    def item(self, delivery: Delivery, body: SyncRequest, device: Device) -> SyncWork:
        return SyncWork(delivery, body, device, self)

    def unknown_device(self, delivery: Delivery, body: SyncRequest, why: str) -> Outcome:
        return unknown_device(delivery, body, why)

    async def run(self, item: SyncWork) -> Outcome:
        return await self._worker.handle(item)

    def internal_error(self, item: SyncWork, exc: Exception) -> Outcome:
        """Retried plainly, with the retry policy's backoff."""
        return Outcome(item.delivery, "retry", retry_delay=self._worker.retry_delay(item.delivery.attempt),
                       reconcile=True)
