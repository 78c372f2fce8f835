"""WireGuard peers from `wg show <if> dump`, without ever keeping a key that is secret.

The dump's first line describes the interface and carries its PRIVATE key; peer lines carry a
preshared key. Both are dropped while parsing: nothing here can log or expose them.
"""

from __future__ import annotations

import asyncio
import ipaddress
from dataclasses import dataclass, field

from agent.errors import TransientError

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class WgPeer:
    public_key: str
    endpoint: str | None
    allowed_ips: list[Network] = field(default_factory=list)
    latest_handshake: float | None = None  # unix time; None = never
    rx_bytes: int = 0
    tx_bytes: int = 0
    keepalive: int | None = None

    @property
    def name(self) -> str:
        """A short, stable, non-secret label for metrics and logs."""
        return self.public_key[:8]


@dataclass(frozen=True)
class WgInterface:
    name: str
    public_key: str
    listen_port: int | None
    peers: list[WgPeer] = field(default_factory=list)


def parse_dump(name: str, text: str) -> WgInterface:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise ValueError("empty wg dump")
    head = lines[0].split("\t")
    if len(head) < 3:
        raise ValueError("unexpected first line of wg dump")
    # head[0] is the private key: deliberately not kept
    port = int(head[2]) if head[2].isdigit() and head[2] != "0" else None
    peers = [_peer(ln.split("\t")) for ln in lines[1:]]
    return WgInterface(name, head[1], port, peers)


def _peer(cols: list[str]) -> WgPeer:
    if len(cols) < 8:
        raise ValueError("unexpected peer line in wg dump")
    public, _preshared, endpoint, allowed, handshake, rx, tx, keepalive = cols[:8]
    nets = [] if allowed in ("(none)", "") else [ipaddress.ip_network(a, strict=False) for a in allowed.split(",")]
    hs = int(handshake) if handshake.isdigit() else 0
    return WgPeer(public_key=public, endpoint=None if endpoint == "(none)" else endpoint, allowed_ips=nets,
                  latest_handshake=float(hs) if hs else None, rx_bytes=int(rx), tx_bytes=int(tx),
                  keepalive=int(keepalive) if keepalive.isdigit() and keepalive != "0" else None)


async def _run(*args: str, timeout: float = 5.0) -> str:
    try:
        proc = await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.PIPE)
    except FileNotFoundError:
        raise TransientError(f"{args[0]} is not installed (Debian package wireguard-tools)") from None
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        raise TransientError(f"`{' '.join(args[:3])}` timed out") from None
    if proc.returncode != 0:
        # stderr of wg never contains key material; stdout may, so it is never quoted
        raise TransientError(f"`{' '.join(args[:3])}` failed: {err.decode(errors='replace').strip()[:200]}")
    return out.decode()


async def read_dump(interface: str) -> WgInterface:
    text = await _run("wg", "show", interface, "dump")
    try:
        return parse_dump(interface, text)
    except ValueError as exc:
        raise TransientError(f"cannot parse `wg show {interface} dump`: {exc}") from None


async def interfaces() -> list[str]:
    return (await _run("wg", "show", "interfaces")).split()
