"""Contract target for `routeros` over the binary API (api://, as on RouterOS v6): the API fake
(tests/support/routeros_api_fake.py) in front of the documented router model the REST target uses.

The service is a PPPoE secret with a live session, so "off" must also end the session. The slow
device accepts TCP but never answers the login; the unreachable one refuses. The router holds 3,000
more secrets, a tenth of them online, read together (thousands of `!re` sentences).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from agent.drivers.base import CredentialStore, DriverContext
from agent.model.device import Device
from tests.drivers.target import Target
from tests.support.routeros_api_fake import RouterOsApiFake
from tests.support.routeros_fake import RouterOsFake
from tests.support.slowserver import SlowServer, refusing_port

USER, PASSWORD, WRONG = "agent", "pw-RouterOS-API-3e9b50", "pw-Wrong-API-81d2aa"
CUSTOMERS = [f"customer-{n:05d}" for n in range(3000)]


def device(address: str, options: dict[str, Any] | None = None, credential: str = "router-admin") -> Device:
    return Device("router", "routeros", address, options={"username": USER, "timeout": 1.0, **(options or {})},
                  credential=credential)


@contextlib.asynccontextmanager
async def target(tmp_path: Path) -> AsyncIterator[Target]:
    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / "router-admin").write_text(PASSWORD + "\n")
    (creds / "router-wrong").write_text(WRONG + "\n")
    router = RouterOsFake(USER, PASSWORD)
    router.version = "6.49.10 (long-term)"
    api = await RouterOsApiFake(router).start()
    router.add("ppp/secret", name="alice", password="customer-pw")
    router.connect("alice")
    for n, name in enumerate(CUSTOMERS):
        router.add("ppp/secret", name=name, password=f"pw-{n}", service="pppoe",
                   disabled="true" if n % 7 == 0 else "false")
        if n % 10 == 1 and n % 7:
            router.connect(name)
    slow = await SlowServer().start()

    async def observe(service: str) -> str:
        name = service.removeprefix("ppp/secret/")
        disabled = all(r["disabled"] == "true" for r in router.find("ppp/secret", name=name))
        return "off" if disabled and not router.find("ppp/active", name=name) else "on"

    async def observe_many(services: list[str]) -> dict[str, str]:
        disabled: dict[str, bool] = {}
        for row in router.tables["ppp/secret"]:
            disabled[row["name"]] = disabled.get(row["name"], True) and row["disabled"] == "true"
        online = {row["name"] for row in router.tables["ppp/active"]}
        return {s: "off" if disabled.get(n, True) and n not in online else "on"
                for s, n in ((s, s.removeprefix("ppp/secret/")) for s in services)}

    try:
        with refusing_port() as closed:
            yield Target(
                driver="routeros",
                context=DriverContext(device_timeout=5.0, credentials=CredentialStore(creds)),
                device=device(api.address),
                service="ppp/secret/alice",
                missing_service="ppp/secret/nobody",
                invalid_service="ip/firewall/filter/alice",
                unreachable=device(f"api://127.0.0.1:{closed}"),
                slow=device(f"api://127.0.0.1:{slow.port}"),
                secrets=[PASSWORD, WRONG],
                observe=observe,
                fake_backed=True,
                bad_credential=device(api.address, credential="router-wrong"),
                notes={"server": "a fake RouterOS API written from MikroTik's API documentation (checked by "
                                 "librouteros), not RouterOS"},
                transport="tcp",
                bulk=[f"ppp/secret/{name}" for name in CUSTOMERS],
                observe_many=observe_many,
            )
    finally:
        await slow.stop()
        await api.stop()
