"""The reconcile message: one device of a sync run, put on the queue by the site's leader.

    {"reconcile": {"run": 17, "device": "r1", "service": null, "dry_run": false}}

Internal to the agents: producers ask for a sync with `agent.request_sync(...)` or `agentctl sync`.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agent.contract import DEVICE_PATTERN, SERVICE_PATTERN
from agent.errors import PermanentError

PREFIX = '{"reconcile"'  # jsonb prints a one-key object as {"reconcile": ...}


class SyncRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    run: int = Field(gt=0, le=2**63 - 1)
    device: str = Field(pattern=DEVICE_PATTERN)
    service: str | None = Field(None, pattern=SERVICE_PATTERN)
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
        err = exc.errors(include_url=False, include_input=False)[0]
        where = ".".join(str(p) for p in err["loc"]) or "message"
        raise PermanentError(f"invalid reconcile message: {where}: {err['msg']}") from None
