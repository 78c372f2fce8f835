"""Contract target for `http`: the RouterOS-like test HTTP device (tests/support/httpdevice.py).

The device here checks HTTP Basic credentials (the plain test device records them but accepts any),
so a wrong credential can be tried; the slow device is a TCP server that never answers, and the
unreachable one a loopback port that refuses connections. The device holds 3,000 PPP secrets besides
the test's own, listed at `list_path` (~550 KB: many segments through the WAN-like link).
"""

from __future__ import annotations

import base64
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

from aiohttp import web

from agent.drivers.base import CredentialStore, DriverContext
from agent.model.device import Device
from tests.drivers.target import Target
from tests.support.httpdevice import HttpDevice
from tests.support.slowserver import SlowServer, refusing_port

USER, PASSWORD, WRONG = "admin", "pw-Contract-7f3c9e", "pw-Wrong-41d0aa"
OPTIONS = {"read_path": "/rest/ppp/secret/{service}", "set_method": "PATCH", "state_pointer": "/disabled",
           "on_value": "false", "off_value": "true", "set_body": {"disabled": "{value}"}, "timeout": 1.0,
           "list_path": "/rest/ppp/secret"}
CUSTOMERS = [f"customer-{n:05d}" for n in range(3000)]


def basic(user: str, password: str) -> str:
    return base64.b64encode(f"{user}:{password}".encode()).decode()


class CheckedHttpDevice(HttpDevice):
    """The test device, refusing /rest/ requests without the right Basic credentials (401)."""

    def __init__(self, user: str, password: str) -> None:
        super().__init__()
        expected = f"Basic {basic(user, password)}"

        @web.middleware
        async def auth(request: web.Request,
                       handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
            if request.path.startswith("/rest/") and request.headers.get("Authorization") != expected:
                return web.json_response({"error": 401, "message": "not authorized"}, status=401)
            return await handler(request)

        self.app.middlewares.append(auth)


@contextlib.asynccontextmanager
async def target(tmp_path: Path) -> AsyncIterator[Target]:
    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / "box-admin").write_text(json.dumps({"username": USER, "password": PASSWORD}))
    (creds / "box-wrong").write_text(json.dumps({"username": USER, "password": WRONG}))
    box = await CheckedHttpDevice(USER, PASSWORD).start()
    box.secrets = {"alice": "true", **{name: "true" if n % 7 == 0 else "false" for n, name in enumerate(CUSTOMERS)}}
    slow = await SlowServer().start()

    async def observe(service: str) -> str:
        return "off" if box.secrets[service] == "true" else "on"

    def device(address: str, credential: str = "box-admin", timeout: float = 5.0) -> Device:
        return Device("box", "http", address, options={**OPTIONS, "timeout": timeout}, credential=credential)

    try:
        with refusing_port() as closed:
            yield Target(
                driver="http",
                context=DriverContext(device_timeout=5.0, credentials=CredentialStore(creds)),
                device=device(f"127.0.0.1:{box.port}"),
                service="alice",
                missing_service="nobody",
                invalid_service="../secret",
                unreachable=device(f"127.0.0.1:{closed}", timeout=1.0),
                slow=device(f"127.0.0.1:{slow.port}", timeout=1.0),
                secrets=[PASSWORD, basic(USER, PASSWORD), WRONG, basic(USER, WRONG)],
                observe=observe,
                bad_credential=device(f"127.0.0.1:{box.port}", "box-wrong"),
                transport="tcp",
                bulk=CUSTOMERS,
            )
    finally:
        await slow.stop()
        await box.stop()
