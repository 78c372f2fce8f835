"""Message contract v1: the only thing a producer depends on.

A message body is a JSON object; `Command.model_json_schema()` is the published schema
(docs/contract.schema.json is generated from it by `agentctl contract schema`).
"""

from __future__ import annotations

import json
import math
import re
from datetime import datetime
from typing import Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from agent.errors import PermanentError
from agent.model.names import DEVICE_PATTERN, SERVICE_PATTERN

REQUEST_ID_PATTERN = "^[^\x00-\x1f\x7f-\x9f]+$"  # any text but control characters
MAX_MESSAGE_BYTES = 64 * 1024
MAX_META_DEPTH = 32

State = Literal["on", "off"]
Observed = Literal["on", "off", "unknown"]


class Command(BaseModel):
    """One device command. Unknown fields are refused so that a typo is an error, not a no-op."""

    model_config = ConfigDict(extra="forbid", frozen=True, title="DeviceCommand")

    v: Literal[1] = Field(1, description="Contract version; only 1 exists.")
    device: str = Field(pattern=DEVICE_PATTERN, description="Inventory id of the device.")
    service: str = Field(pattern=SERVICE_PATTERN, description="Service key on that device.")
    state: State | None = Field(None, description='Desired state; required when action is "set".')
    action: Literal["set", "refresh"] = Field(
        "set", description='"set" converges the device; "refresh" only reads and reports it.'
    )
    request_id: str | None = Field(
        None,
        min_length=1,
        max_length=200,
        json_schema_extra={"pattern": REQUEST_ID_PATTERN},
        description="Idempotency key: a second command with the same key changes nothing. "
        "Echoed into every report.",
    )
    not_after: AwareDatetime | None = Field(
        None, description="RFC 3339 time with offset; a command still queued after it expires."
    )
    meta: dict[str, Any] | None = Field(None, description="Opaque object kept with the report.")

    @field_validator("request_id")
    @classmethod
    def _request_id_is_printable(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(REQUEST_ID_PATTERN, value):
            raise ValueError("must not contain control characters")
        return value

    @field_validator("meta")
    @classmethod
    def _meta_is_plain_json(cls, meta: dict[str, Any] | None) -> dict[str, Any] | None:
        if meta is not None:
            _check_json(meta, 0)
        return meta

    @model_validator(mode="after")
    def _state_matches_action(self) -> Command:
        if self.action == "set" and self.state is None:
            raise ValueError('"state" is required when action is "set"')
        if self.action == "refresh" and self.state is not None:
            raise ValueError('"state" must be absent when action is "refresh"')
        return self

    def expired(self, now: datetime) -> bool:
        return self.not_after is not None and now > self.not_after


def _check_json(value: Any, depth: int) -> None:
    """Numbers must be finite (1e999 parses to infinity, which is not JSON), nesting bounded."""
    if depth > MAX_META_DEPTH:
        raise ValueError(f"nested deeper than {MAX_META_DEPTH} levels")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("holds a number too large for a double (or NaN): not finite JSON")
    if isinstance(value, dict):
        for v in value.values():
            _check_json(v, depth + 1)
    elif isinstance(value, list):
        for v in value:
            _check_json(v, depth + 1)


def parse_command(raw: str | bytes | None, max_bytes: int = MAX_MESSAGE_BYTES) -> Command:
    """Parse one message body, or raise PermanentError with a reason a person can read."""
    if raw is None:
        raise PermanentError("message body is null")
    size = len(raw.encode() if isinstance(raw, str) else raw)
    if size > max_bytes:
        raise PermanentError(f"message is {size} bytes, over the {max_bytes}-byte limit")
    try:
        return Command.model_validate_json(raw)
    except ValidationError as exc:
        raise PermanentError(describe_validation_error(exc, raw)) from None


def describe_validation_error(exc: ValidationError, raw: str | bytes) -> str:
    errors = exc.errors(include_url=False, include_input=False)
    if errors and errors[0]["type"] == "model_type":
        return f"message body must be a JSON object, got {_json_kind(raw)}"
    if errors and errors[0]["type"] == "json_invalid":
        return f"message body is not valid JSON: {errors[0]['msg']}"
    parts = []
    for err in errors[:5]:
        where = ".".join(str(p) for p in err["loc"]) or "message"
        parts.append(f"{where}: {err['msg']}")
    more = f" (+{len(errors) - 5} more)" if len(errors) > 5 else ""
    return "invalid command: " + "; ".join(parts) + more


def _json_kind(raw: str | bytes) -> str:
    try:
        value = json.loads(raw)
    except ValueError:
        return "invalid JSON"
    return {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number"
    )


def json_schema() -> dict[str, Any]:
    schema = Command.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = "https://pgmq-edge-agent/contract/v1/device-command.json"
    return schema
