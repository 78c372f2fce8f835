"""The daemon's own HTTP endpoint on AGENT_HTTP_LISTEN (loopback by default).

/healthz  alive (the process answers)          /readyz  ready to work (503 when not)
/metrics  Prometheus text format               /status  the snapshot behind `agentctl status`
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from agent.text import dumps


async def start(host: str, port: int, *, ready: Callable[[], bool], status: Callable[[], Awaitable[dict[str, Any]]],
                registry: CollectorRegistry, before_scrape: Callable[[], Awaitable[None]]) -> web.AppRunner:
    async def healthz(_req: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def readyz(_req: web.Request) -> web.Response:
        ok = ready()
        return web.json_response({"ready": ok}, status=200 if ok else 503)

    async def metrics(_req: web.Request) -> web.Response:
        await before_scrape()
        body = generate_latest(registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def status_page(_req: web.Request) -> web.Response:
        return web.json_response(await status(), dumps=_dumps)

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/status", status_page)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner


def _dumps(obj: Any) -> str:
    return dumps(obj, indent=None)
