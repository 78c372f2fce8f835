"""A device's HTTP reply body, read whole and under a byte limit: one reader for every HTTP driver.

aiohttp's `StreamReader.read(n)` returns what has arrived so far (at most n bytes), not n bytes.
On loopback a reply arrives in one piece; over a VPN (MTU ~1420) a reply of a few KB arrives in
several segments, so one `read(n)` keeps only the first of them. `read_body` reads to the end of
the body, and stops as soon as the body passes the limit, so a device cannot make the agent hold
more than `limit` bytes (plus one read's worth).
"""

from __future__ import annotations

import aiohttp

from agent.errors import PermanentError

CHUNK = 65536


def over_limit(what: str, limit: int, size: int | None = None) -> PermanentError:
    """The error for a reply longer than `limit` (the device's `max_reply_bytes`)."""
    told = f"of {size} bytes " if size is not None else ""
    return PermanentError(f"{what}: the reply {told}is over the {limit}-byte limit (max_reply_bytes): "
                          f"raise max_reply_bytes for this device if such replies are expected")


async def read_capped(stream: aiohttp.StreamReader, limit: int) -> bytes | None:
    """The whole body, however many segments it arrives in; None as soon as it exceeds `limit` bytes."""
    data = bytearray()
    while chunk := await stream.read(CHUNK):
        data += chunk
        if len(data) > limit:
            return None
    return bytes(data)


async def read_body(resp: aiohttp.ClientResponse, limit: int, what: str) -> bytes:
    """The whole reply body; PermanentError when it is (or says it will be) longer than `limit`.
    A connection cut before the end raises aiohttp's ClientPayloadError (a transport failure)."""
    declared = resp.content_length
    if declared is not None and declared > limit:
        raise over_limit(what, limit, declared)
    body = await read_capped(resp.content, limit)
    if body is None:
        raise over_limit(what, limit)
    return body
