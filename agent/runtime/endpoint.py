"""The daemon's own HTTP endpoint on AGENT_HTTP_LISTEN (loopback by default).

/healthz  alive (the process answers)          /readyz  ready to work (503 when not)
/metrics  Prometheus text format               /status  the snapshot behind `agentctl status`

It is served from the first second: while the agent starts (waiting for the database or the tunnel)
/readyz answers 503, /metrics says not ready and /status says what start-up waits for; the running
agent then publishes its own figures (`Endpoint.serve`).
"""

from __future__ import annotations

import errno
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from agent.errors import ConfigError
from agent.text import dumps


async def _nothing() -> None:
    return None


class Endpoint:
    """What the HTTP endpoint answers, swapped whole when the agent starts running."""

    def __init__(self, starting: Callable[[], str], registry: CollectorRegistry | None = None) -> None:
        """`starting`: the line /status shows until the agent runs; `registry`: what /metrics shows
        meanwhile (metrics.starting_registry: not ready)."""
        self._ready: Callable[[], bool] = lambda: False
        self._status: Callable[[], Awaitable[dict[str, Any]]] = self._starting
        self._registry = registry or CollectorRegistry()
        self._before_scrape: Callable[[], Awaitable[None]] = _nothing
        self._starting_line = starting

    async def _starting(self) -> dict[str, Any]:
        return {"state": "starting", "healthy": False, "status": self._starting_line() or "starting"}

    def serve(self, *, ready: Callable[[], bool], status: Callable[[], Awaitable[dict[str, Any]]],
              registry: CollectorRegistry, before_scrape: Callable[[], Awaitable[None]]) -> None:
        self._ready, self._status, self._registry, self._before_scrape = ready, status, registry, before_scrape

    def app(self) -> web.Application:
        async def healthz(_req: web.Request) -> web.Response:
            return web.json_response({"status": "alive"})

        async def readyz(_req: web.Request) -> web.Response:
            ok = self._ready()
            return web.json_response({"ready": ok}, status=200 if ok else 503)

        async def metrics(_req: web.Request) -> web.Response:
            await self._before_scrape()
            return web.Response(body=generate_latest(self._registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

        async def status_page(_req: web.Request) -> web.Response:
            return web.json_response(await self._status(), dumps=_dumps)

        app = web.Application()
        app.router.add_get("/healthz", healthz)
        app.router.add_get("/readyz", readyz)
        app.router.add_get("/metrics", metrics)
        app.router.add_get("/status", status_page)
        return app

    async def start(self, host: str, port: int) -> web.AppRunner:
        """Listen on host:port. A port in use or an address not of this host is a configuration
        error (ConfigError naming AGENT_HTTP_LISTEN): restarting would only meet it again."""
        runner = web.AppRunner(self.app(), access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
        except OSError as exc:
            await runner.cleanup()
            why = {errno.EADDRINUSE: "the port is in use (another agentd, or another program)",
                   errno.EADDRNOTAVAIL: "the address is not one of this host's",
                   errno.EACCES: "permission denied (a port below 1024?)"}.get(exc.errno or 0, exc.strerror or str(exc))
            raise ConfigError(f"cannot listen on AGENT_HTTP_LISTEN {host}:{port}: {why}; choose another "
                              "address:port, or set AGENT_HTTP_LISTEN empty to serve no HTTP") from None
        return runner


def _dumps(obj: Any) -> str:
    return dumps(obj, indent=None)
