"""A device of the inventory and the two states a service can be in."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

State = Literal["on", "off"]


@dataclass(frozen=True)
class Device:
    id: str
    driver: str
    address: str | None = None
    site: str = "default"
    options: dict[str, Any] = field(default_factory=dict)
    credential: str | None = None  # the *name* of a credential on the agent host, never a secret
    paused: str | None = None      # why the operator paused it (`agentctl device pause`); None: not paused

    def __hash__(self) -> int:
        return hash(self.id)
