"""Contract target for `sim`: a simulated device whose state lives in a JSON state file.

The suite observes the state by reading that file, not through the driver. sim has no network, no
credential and no missing objects (every service exists, starting at `initial`), so the checks that
need those are skipped here with the reason.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

from agent.drivers.base import DriverContext
from agent.model.device import Device
from tests.drivers.target import Target

NO_NETWORK = "sim does no I/O: it has no address, so it cannot be unreachable or slow to answer"


@contextlib.asynccontextmanager
async def target(tmp_path: Path) -> AsyncIterator[Target]:
    state_file = tmp_path / "sim-state.json"
    state_file.write_text(json.dumps({"wifi": "off"}))
    device = Device("sim-1", "sim", options={"state_file": str(state_file)})

    async def observe(service: str) -> str:
        return str(json.loads(state_file.read_text()).get(service, "off"))

    yield Target(
        driver="sim",
        context=DriverContext(device_timeout=5.0),
        device=device,
        service="wifi",
        missing_service="nothing-is-missing-on-sim",
        invalid_service="bad key\n",
        unreachable=device,
        slow=device,
        secrets=[],
        observe=observe,
        skip={
            "missing_object_is_permanent": "sim has no missing objects: every service exists, starting at `initial`",
            "unreachable_device_fails_to_connect": NO_NETWORK,
            "slow_device_hits_its_timeout": NO_NETWORK,
            "secrets_never_appear_in_errors_or_logs": "sim takes no credential",
        },
    )
