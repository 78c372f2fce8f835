"""Device host names to IPs, resolved off the event loop with a deadline, cached with an expiry.

The guard asks `cached()` on every gate check: it never blocks. Names it does not know yet (or
whose entry expired) are resolved in the background with asyncio's resolver, a few at a time and
each within `timeout`, so 200 names that do not resolve cost start-up nothing, and a device
whose DNS record changes is followed within `ttl`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any
from urllib.parse import urlsplit

log = logging.getLogger("agent.vpn")


def address_host(address: str | None) -> str | None:
    """The host part of an address (host, host:port, [v6]:port or URL), as written (pure)."""
    if not address:
        return None
    try:
        return urlsplit(address if "://" in address else f"//{address}").hostname or None
    except ValueError:
        return None


def literal_ip(host: str) -> str | None:
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return None


class HostResolver:
    def __init__(self, ttl: float = 300.0, negative_ttl: float = 30.0, timeout: float = 3.0,
                 parallel: int = 16, on_change: Callable[[], None] | None = None,
                 lookup: Callable[[str], Awaitable[list[Any]]] | None = None) -> None:
        self._ttl, self._negative_ttl, self._timeout = ttl, negative_ttl, timeout
        self._parallel = asyncio.Semaphore(parallel)
        self._cache: dict[str, tuple[str | None, float]] = {}  # name -> (ip or None, expires, monotonic)
        self._task: asyncio.Task[None] | None = None
        self._on_change = on_change or (lambda: None)
        self._lookup = lookup or _getaddrinfo

    def cached(self, address: str | None) -> str | None:
        """The IP for an address now, without waiting: literal IPs at once, names from the cache
        (an expired entry is still used until its refresh answers)."""
        host = address_host(address)
        if host is None:
            return None
        if (ip := literal_ip(host)) is not None:
            return ip
        entry = self._cache.get(host)
        return entry[0] if entry else None

    def stale(self, addresses: Iterable[str | None]) -> list[str]:
        now = time.monotonic()
        names = {h for a in addresses if (h := address_host(a)) and literal_ip(h) is None}
        return sorted(n for n in names if n not in self._cache or self._cache[n][1] <= now)

    def kick(self, addresses: Iterable[str | None]) -> None:
        """Resolve, in the background, the names that are missing or expired."""
        names = self.stale(addresses)
        if names and (self._task is None or self._task.done()):
            self._task = asyncio.create_task(self.refresh(names))

    async def refresh(self, names: list[str]) -> None:
        results = await asyncio.gather(*(self._resolve(n) for n in names))
        changed = False
        now = time.monotonic()
        for name, ip in zip(names, results):
            old = self._cache.get(name)
            self._cache[name] = (ip, now + (self._ttl if ip else self._negative_ttl))
            changed |= old is None or old[0] != ip
        if changed:
            self._on_change()

    async def _resolve(self, name: str) -> str | None:
        async with self._parallel:
            try:
                async with asyncio.timeout(self._timeout):
                    infos = await self._lookup(name)
            except (OSError, TimeoutError, UnicodeError) as exc:
                log.debug("cannot resolve %s: %s", name, exc, extra={"action": "resolve_failed"})
                return None
        return str(infos[0][4][0]) if infos else None

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()


async def _getaddrinfo(name: str) -> list[Any]:
    """asyncio's resolver: the blocking call runs in the default executor, off the event loop."""
    return await asyncio.get_running_loop().getaddrinfo(name, None, type=socket.SOCK_STREAM)
