"""Contract target for `routeros` over the binary API (api://, as on RouterOS v6): the API fake
(tests/support/routeros_api_fake.py) in front of the documented router model the REST target uses.

The service is a PPPoE secret with a live session, so "off" must also end the session. The slow
device accepts TCP but never answers the login; the unreachable one refuses.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from agent.drivers.base import CredentialStore, Device, DriverContext
from tests.drivers.target import Target
from tests.support.routeros_api_fake import RouterOsApiFake
from tests.support.routeros_fake import RouterOsFake
from tests.support.slowserver import SlowServer, refusing_port

USER, PASSWORD, WRONG = "agent", "pw-RouterOS-API-3e9b50", "pw-Wrong-API-81d2aa"


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
    slow = await SlowServer().start()

    async def observe(service: str) -> str:
        name = service.removeprefix("ppp/secret/")
        disabled = all(r["disabled"] == "true" for r in router.find("ppp/secret", name=name))
        return "off" if disabled and not router.find("ppp/active", name=name) else "on"

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
            )
    finally:
        await slow.stop()
        await api.stop()
