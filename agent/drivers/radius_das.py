"""Requests to a NAS's Dynamic Authorization Server (RFC 5176): pyrad encodes and verifies the packets,
the UDP exchange is our own so that every try has its deadline and every datagram is judged.

One fresh socket per request, connected to the NAS (the kernel drops datagrams from anyone else and
reports ICMP port-unreachable as ECONNREFUSED). The same packet, same Identifier and authenticator, is
sent again on each retry, so a NAS that acts on a retransmission acts once (RFC 5080 section 2.2.2).
A datagram whose Identifier does not match, that does not decode, or whose Response Authenticator does
not verify is ignored; the first verified reply ends the exchange, so later duplicates are never read.

How an exchange with no reply ends. A NAS drops a request signed with another shared secret without a
word (RFC 5176 section 3: a bad authenticator is silently discarded), exactly as it drops one from a host
it does not take Dynamic Authorization from; a NAS that is down, or a path that loses everything, is silent
too. They are told apart by asking the host something that needs no secret: when the last try starts
unanswered, a TCP connection to the DAS's port number. If the host accepts or refuses it (RST) within
that try's time, the host is up and reached, so its DAS received the requests and dropped them: a
configuration error naming the credential (or the NAS's list of DA clients). If the host is silent to
that too, nothing is known: NoAnswerError, as for any silent device. An ICMP port-unreachable for the
UDP itself is an UnreachableError (the DAS is not enabled there).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import struct
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from pyrad.dictionary import Dictionary
from pyrad.packet import CoAPacket, PacketError

from agent.drivers import radius_proto as p
from agent.errors import ConfigError, NoAnswerError, TransientError, UnreachableError
from agent.text import clean

DICTIONARY_FILE = Path(__file__).with_name("radius.dictionary")
ERROR_CAUSE = 101
MAX_QUEUED = 64          # datagrams held while a try waits; a flood past this is dropped
REPLY_CODES = {p.DISCONNECT_REQUEST: {p.DISCONNECT_ACK, p.DISCONNECT_NAK}, p.COA_REQUEST: {p.COA_ACK, p.COA_NAK}}


@functools.cache
def dictionary() -> Dictionary:
    return Dictionary(str(DICTIONARY_FILE))


@dataclass(frozen=True)
class Reply:
    code: int
    causes: list[int]


@dataclass(frozen=True)
class Target:
    """Where and how to ask: the NAS's DAS, its shared secret, and the exchange's timing: `timeout` seconds
    for all tries (unless the caller's deadline says otherwise), shared by the first try and `retries`."""

    host: str
    port: int
    secret: bytes
    credential: str | None
    timeout: float
    retries: int


def build(code: int, secret: bytes, attributes: p.Attributes) -> CoAPacket:
    """A Disconnect- or CoA-Request with a Message-Authenticator (BlastRADIUS hardening; RFC 5176 allows it).
    ConfigError names an attribute the dictionary does not know or a value it cannot encode."""
    packet = CoAPacket(code=code, secret=secret, dict=dictionary())
    packet.add_message_authenticator()
    for name, value in attributes:
        try:
            kind = dictionary().attributes[name].type
        except KeyError:
            raise ConfigError(f"radius: attribute {clean(name, 64)!r} is not in the driver's dictionary "
                              f"({DICTIONARY_FILE.name}; see docs/drivers.md for the ones it holds)") from None
        try:
            packet.AddAttribute(name, int(value) if kind == "integer" and str(value).isdigit() else value)
        except (ValueError, TypeError, KeyError, struct.error) as exc:
            raise ConfigError(f"radius: {clean(name, 64)}={clean(value, 64)!r} cannot be sent: "
                              f"{clean(exc, 120)}") from None
    return packet


def check_attributes(attributes: p.Attributes) -> None:
    """Raise ConfigError now, not at month-end, for attributes that cannot be encoded."""
    build(p.COA_REQUEST, b"check", attributes).RequestPacket()


def judge(request: CoAPacket, data: bytes) -> Reply | None:
    """The reply in `data` if it answers `request` and verifies; None for anything else."""
    try:
        reply = request.CreateReply(packet=data)
    except (PacketError, KeyError, ValueError, struct.error):
        return None
    if reply.code not in REPLY_CODES[request.code] or not request.VerifyReply(reply, data):
        return None
    causes = [struct.unpack("!I", v)[0] for v in OrderedDict.get(reply, ERROR_CAUSE, []) if len(v) == 4]
    return Reply(reply.code, causes)


class _Receiver(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes | OSError] = asyncio.Queue(MAX_QUEUED)

    def datagram_received(self, data: bytes, addr: object) -> None:
        if not self.queue.full():
            self.queue.put_nowait(data)

    def error_received(self, exc: Exception) -> None:
        if isinstance(exc, OSError) and not self.queue.full():
            self.queue.put_nowait(exc)


async def exchange(target: Target, code: int, attributes: p.Attributes, what: str,
                   deadline: float | None = None) -> Reply:
    """Send one request, retransmitted up to `retries` times, and return the first verified reply. Each try
    waits an equal share of the time left until `deadline` (event-loop time; default: `timeout` from now),
    so the exchange's own error, not a caller's timeout, is what a silent NAS ends in."""
    request = build(code, target.secret, attributes)
    raw = request.RequestPacket()
    loop = asyncio.get_running_loop()
    where = f"{what}: {target.host}:{target.port}"
    try:
        transport, receiver = await loop.create_datagram_endpoint(_Receiver, remote_addr=(target.host, target.port))
    except OSError as exc:
        raise UnreachableError(f"{where}: cannot send: {clean(exc.strerror or exc, 200)}") from None
    end = deadline if deadline is not None else loop.time() + target.timeout
    tries = target.retries + 1
    unverified = 0
    alive: asyncio.Task[str | None] | None = None  # the host's answer to a TCP connection, asked on the last try
    try:
        for n in range(tries):
            transport.sendto(raw)
            try_end = loop.time() + max(0.0, end - loop.time()) / (tries - n)
            if n == tries - 1 and not unverified:
                alive = asyncio.ensure_future(host_answers(target.host, target.port, try_end - loop.time()))
            while (left := try_end - loop.time()) > 0:
                try:
                    item = await asyncio.wait_for(receiver.queue.get(), left)
                except TimeoutError:
                    break
                if isinstance(item, ConnectionRefusedError):
                    raise UnreachableError(f"{where}: the NAS refuses Dynamic Authorization requests (ICMP port "
                                           f"unreachable): enable it there, e.g. MikroTik `/radius incoming set "
                                           f"accept=yes port={target.port}`") from None
                if isinstance(item, OSError) and item.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
                    raise UnreachableError(f"{where}: no route: {clean(item.strerror or item, 200)}") from None
                if isinstance(item, OSError):
                    raise TransientError(f"{where}: {clean(item.strerror or item, 200)}") from None
                reply = judge(request, item)
                if reply is not None:
                    return reply
                unverified += 1
    finally:
        transport.close()
        answered = alive.result() if alive is not None and alive.done() and not alive.cancelled() else None
        if alive is not None and not alive.done():
            alive.cancel()  # not awaited: a cancellation of this exchange must not be swallowed here
    cred = f"credential {target.credential!r}" if target.credential else "the credential"
    if unverified:
        raise ConfigError(f"{where}: the NAS answered, but no reply verifies with the shared secret in {cred}: "
                          f"the secrets differ")
    if answered is not None:
        raise ConfigError(p.dropped(where, tries, answered, target.credential))
    raise NoAnswerError(p.no_answer(where, tries, target.credential))


async def host_answers(host: str, port: int, seconds: float) -> str | None:
    """Whether the NAS's host is up and reached, asked without the secret: a TCP connection to the DAS's
    port number, "accepted" or "refused" (RST) within `seconds`; None when it is silent or not routed."""
    if seconds <= 0:
        return None
    try:
        async with asyncio.timeout(seconds):
            _, writer = await asyncio.open_connection(host, port)
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    except ConnectionRefusedError:
        return "refused"
    except (OSError, TimeoutError):
        return None
    return "accepted"
