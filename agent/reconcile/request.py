"""The reconcile message: one device of a sync run, put on the queue by the site's leader.

    {"reconcile": {"run": 17, "device": "r1", "service": null, "dry_run": false}}

Internal to the agents: producers ask for a sync with `agent.request_sync(...)` or `agentctl sync`.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, ValidationError

from agent.errors import PermanentError

PREFIX = '{"reconcile"'  # jsonb prints a one-key object as {"reconcile": ...}


class SyncRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    run: int
    device: str
    service: str | None = None
    dry_run: bool = False


class _Envelope(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reconcile: SyncRequest


def is_sync(raw: str | None) -> bool:
    return raw is not None and raw.startswith(PREFIX)


def parse_sync(raw: str) -> SyncRequest:
    try:
        return _Envelope.model_validate_json(raw).reconcile
    except ValidationError as exc:
        raise PermanentError(f"invalid reconcile message: {exc.errors(include_url=False)[0]['msg']}") from None
