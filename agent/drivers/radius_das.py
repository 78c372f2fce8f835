"""Requests to a NAS's Dynamic Authorization Server (RFC 5176): pyrad encodes and verifies the packets,
the UDP exchange is our own so that every try has its deadline and every datagram is judged.

One fresh socket per request, connected to the NAS (the kernel drops datagrams from anyone else and
reports ICMP port-unreachable as ECONNREFUSED). The same packet, same Identifier and authenticator, is
sent again on each retry, so a NAS that acts on a retransmission acts once (RFC 5080 section 2.2.2).
A datagram whose Identifier does not match, that does not decode, or whose Response Authenticator does
not verify is ignored; the first verified reply ends the exchange, so later duplicates are never read.
"""

from __future__ import annotations

import asyncio
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
    try:
        for n in range(tries):
            transport.sendto(raw)
            try_end = loop.time() + max(0.0, end - loop.time()) / (tries - n)
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
    if unverified:
        cred = f"credential {target.credential!r}" if target.credential else "the credential"
        raise ConfigError(f"{where}: the NAS answered, but no reply verifies with the shared secret in {cred}: "
                          f"the secrets differ")
    raise NoAnswerError(p.no_answer(where, tries, target.credential))
