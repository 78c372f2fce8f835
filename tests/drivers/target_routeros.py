"""Contract target for `routeros`: the documented fake (tests/support/routeros_fake.py) over HTTPS
with a throwaway self-signed certificate pinned by tls_fingerprint, as operators pin RouterOS's own.

The service is a PPPoE secret with a live session, so "off" must also end the session. The slow
device accepts TCP but never answers (the TLS handshake waits); the unreachable one refuses. The router
holds 3,000 more secrets, a tenth of them online, read together (a ~170 KB print).
"""

from __future__ import annotations

import base64
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from agent.drivers.base import CredentialStore, DriverContext
from agent.model.device import Device
from tests.drivers.target import Target
from tests.support.routeros_fake import RouterOsFake, self_signed
from tests.support.slowserver import SlowServer, refusing_port

USER, PASSWORD, WRONG = "agent", "pw-RouterOS-5b7e21", "pw-Wrong-c04f9d"
CUSTOMERS = [f"customer-{n:05d}" for n in range(3000)]


def basic(user: str, password: str) -> str:
    return base64.b64encode(f"{user}:{password}".encode()).decode()


def device(address: str, options: dict[str, Any], credential: str = "router-admin") -> Device:
    return Device("router", "routeros", address, options={"username": USER, "timeout": 1.0, **options},
                  credential=credential)


@contextlib.asynccontextmanager
async def target(tmp_path: Path) -> AsyncIterator[Target]:
    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / "router-admin").write_text(PASSWORD + "\n")
    (creds / "router-wrong").write_text(WRONG + "\n")
    cert = self_signed(tmp_path)
    router = await RouterOsFake(USER, PASSWORD).start(tls=cert)
    router.add("ppp/secret", name="alice", password="customer-pw")
    router.connect("alice")
    for n, name in enumerate(CUSTOMERS):
        router.add("ppp/secret", name=name, password=f"pw-{n}", service="pppoe", profile="default",
                   disabled="true" if n % 7 == 0 else "false")
        if n % 10 == 1 and n % 7:  # online customers are enabled ones
            router.connect(name)
    slow = await SlowServer().start()
    pinned = {"tls_fingerprint": cert.sha256}

    async def observe(service: str) -> str:
        name = service.removeprefix("ppp/secret/")
        disabled = all(r["disabled"] == "true" for r in router.find("ppp/secret", name=name))
        return "off" if disabled and not router.find("ppp/active", name=name) else "on"

    async def observe_many(services: list[str]) -> dict[str, str]:
        disabled: dict[str, bool] = {}
        for row in router.tables["ppp/secret"]:
            disabled[row["name"]] = disabled.get(row["name"], True) and row["disabled"] == "true"
        online = {row["name"] for row in router.tables["ppp/active"]}
        names = {service: service.removeprefix("ppp/secret/") for service in services}
        return {service: "off" if disabled.get(name, True) and name not in online else "on"
                for service, name in names.items()}

    try:
        with refusing_port() as closed:
            yield Target(
                driver="routeros",
                context=DriverContext(device_timeout=5.0, credentials=CredentialStore(creds)),
                device=device(router.url, {**pinned, "timeout": 5.0}),
                service="ppp/secret/alice",
                missing_service="ppp/secret/nobody",
                invalid_service="ip/firewall/filter/alice",
                unreachable=device(f"https://127.0.0.1:{closed}", pinned),
                slow=device(f"https://127.0.0.1:{slow.port}", pinned),
                secrets=[PASSWORD, basic(USER, PASSWORD), WRONG, basic(USER, WRONG)],
                observe=observe,
                fake_backed=True,
                bad_credential=device(router.url, {**pinned, "timeout": 5.0}, "router-wrong"),
                notes={"server": "a fake written from MikroTik's REST API documentation, not RouterOS"},
                transport="tcp",
                bulk=[f"ppp/secret/{name}" for name in CUSTOMERS],
                observe_many=observe_many,
            )
    finally:
        await slow.stop()
        await router.stop()
