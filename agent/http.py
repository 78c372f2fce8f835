"""The daemon's own HTTP endpoint on AGENT_HTTP_LISTEN (loopback by default): /healthz, /readyz."""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web


async def start(host: str, port: int, ready: Callable[[], tuple[bool, dict[str, object]]]) -> web.AppRunner:
    async def healthz(_req: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def readyz(_req: web.Request) -> web.Response:
        ok, detail = ready()
        return web.json_response({"ready": ok, **detail}, status=200 if ok else 503)

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
