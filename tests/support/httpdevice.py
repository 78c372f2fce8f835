"""A simulated HTTP device (the far edge): RouterOS-like REST with string values.

    GET   /rest/ppp/secret/<name>   -> {"name": ..., "disabled": "true" | "false"}
    GET   /rest/ppp/secret          -> every secret, as RouterOS lists them ([{".id", "name", "disabled",
                                       "service", "profile", "comment", ...}]: ~150 bytes an entry)
    PATCH /rest/ppp/secret/<name>   {"disabled": "true" | "false"} -> the object
    POST  /_control                 {"fail": [503, 503], "delay": 0.5, "lie": true, "set": {"name": "true"}}
    GET   /_control                 -> {"secrets": {...}, "requests": [...], "times": [...], "auth": [...]}

`times` holds when each request arrived (time.monotonic() of the device's process), in order.

Run it as a process too (e.g. inside a network namespace): python -m tests.support.httpdevice HOST PORT
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

from aiohttp import web


class HttpDevice:
    def __init__(self) -> None:
        self.secrets: dict[str, str] = {}
        self.requests: list[tuple[str, str]] = []
        self.times: list[float] = []  # when each request arrived (monotonic), as `requests`
        self.auth: list[str | None] = []
        self.fail: list[int] = []
        self.delay = 0.0
        self.lie = False
        self.app = web.Application()
        self.app.router.add_route("GET", "/rest/ppp/secret", self._list)
        self.app.router.add_route("GET", "/rest/ppp/secret/{name}", self._get)
        self.app.router.add_route("PATCH", "/rest/ppp/secret/{name}", self._patch)
        self.app.router.add_route("POST", "/_control", self._control)
        self.app.router.add_route("GET", "/_control", self._report)
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> HttpDevice:
        self.runner = web.AppRunner(self.app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, host, port)
        await site.start()
        self.port = self.runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    async def _common(self, request: web.Request) -> web.Response | None:
        self.requests.append((request.method, request.raw_path))
        self.times.append(time.monotonic())
        self.auth.append(request.headers.get("Authorization"))
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.fail:
            status = self.fail.pop(0)
            return web.json_response({"error": status, "message": "injected"}, status=status)
        return None

    async def _get(self, request: web.Request) -> web.Response:
        if (early := await self._common(request)) is not None:
            return early
        name = request.match_info["name"]
        if name not in self.secrets:
            return web.json_response({"error": 404, "message": "no such item"}, status=404)
        return web.json_response({"name": name, "disabled": self.secrets[name]})

    async def _list(self, request: web.Request) -> web.Response:
        if (early := await self._common(request)) is not None:
            return early
        return web.json_response([{".id": f"*{n:X}", "name": name, "service": "pppoe", "profile": "default",
                                   "local-address": "10.0.0.1", "comment": "managed by billing",
                                   "last-logged-out": "2026-11-30 23:59:59", "disabled": disabled}
                                  for n, (name, disabled) in enumerate(self.secrets.items(), 1)])

    async def _patch(self, request: web.Request) -> web.Response:
        if (early := await self._common(request)) is not None:
            return early
        name = request.match_info["name"]
        if name not in self.secrets:
            return web.json_response({"error": 404, "message": "no such item"}, status=404)
        body = await request.json()
        if not isinstance(body.get("disabled"), str):
            return web.json_response({"error": 400, "message": "disabled must be a string"}, status=400)
        if not self.lie:
            self.secrets[name] = body["disabled"]
        return web.json_response({"name": name, "disabled": self.secrets[name]})

    async def _control(self, request: web.Request) -> web.Response:
        body: dict[str, Any] = await request.json()
        self.fail = list(body.get("fail", self.fail))
        self.delay = float(body.get("delay", self.delay))
        self.lie = bool(body.get("lie", self.lie))
        self.secrets.update(body.get("set", {}))
        return web.json_response({"ok": True})

    async def _report(self, _request: web.Request) -> web.Response:
        return web.json_response({"secrets": self.secrets, "requests": self.requests, "times": self.times,
                                  "auth": self.auth})


async def _main(host: str, port: int, names: list[str]) -> None:
    device = HttpDevice()
    device.secrets = {n: "true" for n in names}
    await device.start(host, port)
    print(f"listening on {host}:{device.port}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(_main(sys.argv[1], int(sys.argv[2]), sys.argv[3:]))
