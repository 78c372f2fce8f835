"""How the contract suite reaches a target: direct (loopback), or through a WAN-like link.

Loopback delivers every reply in one piece and never loses a packet; a VPN to a customer site does
neither. In the "wan" run the working device (and the bad-credential device when it has the same
address) is reached through tests/support/wan.py: a TCP proxy adding latency and cutting every write
into 1,380-byte segments, or for UDP a relay that delays, reorders, drops and duplicates datagrams
(seeded, so a failure can be repeated). The unreachable and slow devices stay direct: what they test
does not cross a working link. Latencies are small, so the WAN run stays quick.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import zlib
from collections.abc import AsyncIterator
from typing import Any

import pytest

from agent.model.device import Device
from tests.drivers.target import Target
from tests.support.wan import MTU_SEGMENT, TcpProxy, UdpRelay

LINKS = ["direct", "wan"]
TCP: dict[str, Any] = {"latency": 0.005, "segment": MTU_SEGMENT, "gap": 0.001}
UDP: dict[str, Any] = {"delay": 0.005, "jitter": 0.005, "drop": 0.03, "duplicate": 0.1}
SEED = 19  # each check's relay is seeded with SEED and its name (reseed)
# checks that only use the unreachable or slow devices (direct in both runs) are not run twice
OFF_THE_LINK = {"target_devices_pass_option_validation": "only checks options",
                "unreachable_device_fails_to_connect": "the unreachable device is not behind the link",
                "slow_device_hits_its_timeout": "the slow device is not behind the link"}

_relays: dict[str, UdpRelay] = {}
_proxies: dict[str, TcpProxy] = {}

_ENDPOINT = re.compile(r"^(?P<scheme>[a-z][a-z0-9+.-]*://)?(?P<host>\[[^\]]+\]|[^:/\[\]]+):(?P<port>\d+)(?P<rest>/.*)?$")


def endpoint(address: str | None) -> tuple[str, int]:
    """The host and port of a device address ("host:port", "scheme://host:port[/...]", "[v6]:port")."""
    found = _ENDPOINT.match(address or "")
    if found is None:
        raise pytest.UsageError(f"contract target address {address!r} has no host:port to put a WAN link in front of")
    return found["host"].strip("[]"), int(found["port"])


def moved(device: Device, address: str) -> Device:
    """The same device entry, at `address` (host:port) instead, scheme and path kept."""
    found = _ENDPOINT.match(device.address or "")
    assert found is not None
    return dataclasses.replace(device, address=f"{found['scheme'] or ''}{address}{found['rest'] or ''}")


@contextlib.asynccontextmanager
async def through_wan(target: Target) -> AsyncIterator[Target]:
    """`target` with its working device behind a WAN-like link for the target's transport."""
    if target.transport not in ("tcp", "udp"):
        pytest.skip(f"target for {target.driver} does not say its transport (Target.transport 'tcp' or 'udp'): "
                    f"no WAN-like link to put in front of it")
    upstream = endpoint(target.device.address)
    link: TcpProxy | UdpRelay = TcpProxy(upstream, **TCP) if target.transport == "tcp" else UdpRelay(upstream, **UDP)
    await link.start(upstream[0])
    if isinstance(link, UdpRelay):
        _relays[target.driver] = link
    else:
        _proxies[target.driver] = link
    bad = target.bad_credential
    try:
        yield dataclasses.replace(
            target, device=moved(target.device, link.address),
            bad_credential=moved(bad, link.address) if bad is not None and endpoint(bad.address) == upstream else bad,
            notes={**target.notes, "link": f"{target.transport} through tests/support/wan.py "
                                            f"{TCP if target.transport == 'tcp' else UDP}"})
    finally:
        _relays.pop(target.driver, None)
        _proxies.pop(target.driver, None)
        await link.stop()


def proxy(driver: str) -> TcpProxy | None:
    """The TCP proxy in front of `driver`'s target in the WAN run (None: direct, or UDP)."""
    return _proxies.get(driver)


def reseed(driver: str, check: str) -> None:
    """Give each check its own run of losses and duplicates, the same whichever checks run before it."""
    if (relay := _relays.get(driver)) is not None:
        relay.random.seed(SEED + zlib.crc32(check.encode()))
