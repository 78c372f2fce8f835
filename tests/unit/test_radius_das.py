"""The radius driver's UDP exchange: which datagrams end it, which are ignored, and how silence and refusal
end. A loopback responder built from pyrad answers as a NAS would (or does not); FreeRADIUS itself is in
tests/integration/test_radius.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pyrad.packet import CoAPacket

from agent.drivers import radius_das as das
from agent.drivers import radius_proto as p
from agent.errors import ConfigError, NoAnswerError, UnreachableError
from tests.support.freeradius import tcp_black_hole, tcp_listener
from tests.support.snmpd import closed_udp_port

SECRET = b"das-secret-1f3a"
ATTRS = (("NAS-IP-Address", "192.0.2.1"), ("User-Name", "alice"))
Answer = Callable[[CoAPacket, bytes], list[bytes]]


def reply(request: CoAPacket, code: int, secret: bytes = SECRET, cause: int | None = None) -> bytes:
    r = request.CreateReply()
    r.code, r.secret = code, secret
    if cause is not None:
        r.AddAttribute("Error-Cause", cause)
    return bytes(r.ReplyPacket())


class Nas(asyncio.DatagramProtocol):
    """Decodes each request and sends what `answer` returns for it; keeps every datagram it got."""

    def __init__(self, answer: Answer) -> None:
        self.answer, self.received = answer, []
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.received.append(data)
        request = CoAPacket(packet=data, secret=SECRET, dict=das.dictionary())
        for out in self.answer(request, data):
            self.transport.sendto(out, addr)


@pytest.fixture
async def nas() -> AsyncIterator[Callable[[Answer], Any]]:
    made = []

    async def start(answer: Answer) -> tuple[Nas, das.Target]:
        transport, proto = await asyncio.get_running_loop().create_datagram_endpoint(
            lambda: Nas(answer), local_addr=("127.0.0.1", 0))
        made.append(transport)
        port = transport.get_extra_info("sockname")[1]
        return proto, das.Target("127.0.0.1", port, SECRET, "nas-secret", timeout=0.9, retries=2)

    yield start
    for t in made:
        t.close()


async def test_a_verified_ack_ends_the_exchange(nas: Any) -> None:
    server, target = await nas(lambda req, raw: [reply(req, p.DISCONNECT_ACK)])
    got = await das.exchange(target, p.DISCONNECT_REQUEST, ATTRS, "t")
    assert got == das.Reply(p.DISCONNECT_ACK, [])
    assert len(server.received) == 1


async def test_a_nak_carries_its_error_causes(nas: Any) -> None:
    _, target = await nas(lambda req, raw: [reply(req, p.DISCONNECT_NAK, cause=503)])
    assert await das.exchange(target, p.DISCONNECT_REQUEST, ATTRS, "t") == das.Reply(p.DISCONNECT_NAK, [503])


async def test_a_lost_request_is_sent_again_byte_for_byte(nas: Any) -> None:
    seen: list[bytes] = []

    def answer(req: CoAPacket, raw: bytes) -> list[bytes]:
        seen.append(raw)
        return [reply(req, p.DISCONNECT_ACK)] if len(seen) == 2 else []  # the first one "lost"

    _, target = await nas(answer)
    await das.exchange(target, p.DISCONNECT_REQUEST, ATTRS, "t")
    assert len(seen) == 2 and seen[0] == seen[1]  # same Identifier and authenticator: the NAS acts once


async def test_strays_and_forgeries_are_ignored_until_the_real_reply(nas: Any) -> None:
    def answer(req: CoAPacket, raw: bytes) -> list[bytes]:
        other = CoAPacket(code=p.DISCONNECT_REQUEST, id=(req.id + 1) % 256, secret=SECRET, dict=das.dictionary())
        other.RequestPacket()
        return [b"\x00garbage", reply(req, p.DISCONNECT_ACK, secret=b"forged"), reply(other, p.DISCONNECT_ACK),
                reply(req, p.COA_ACK), reply(req, p.DISCONNECT_NAK, cause=503), reply(req, p.DISCONNECT_ACK)]

    _, target = await nas(answer)
    assert await das.exchange(target, p.DISCONNECT_REQUEST, ATTRS, "t") == das.Reply(p.DISCONNECT_NAK, [503])


async def test_only_unverifiable_replies_mean_another_shared_secret(nas: Any) -> None:
    _, target = await nas(lambda req, raw: [reply(req, p.DISCONNECT_NAK, secret=b"the-nas-own", cause=503)])
    with pytest.raises(ConfigError, match=r"'nas-secret'.*secrets differ"):
        await das.exchange(target, p.DISCONNECT_REQUEST, ATTRS, "t")


async def test_silence_from_a_host_that_answers_is_a_dropped_request_naming_the_credential(nas: Any) -> None:
    """The host refuses a TCP connection to the DAS's port at once (it is up and reached), yet the DAS never
    answered: it dropped the requests, as a NAS does one signed with another secret."""
    server, target = await nas(lambda req, raw: [])
    with pytest.raises(ConfigError, match="'nas-secret'") as caught:
        await das.exchange(target, p.COA_REQUEST, ATTRS, "t")
    assert "dropped" in str(caught.value) and "refused at once" in str(caught.value)
    assert SECRET.decode() not in str(caught.value)
    assert len(server.received) == 3  # the first try and two retries


async def test_silence_from_a_host_silent_to_tcp_too_is_no_answer_naming_the_credential(nas: Any) -> None:
    server, target = await nas(lambda req, raw: [])
    with tcp_black_hole(target.port):  # SYNs to that port go unanswered: nothing is known of the host
        with pytest.raises(NoAnswerError, match="'nas-secret'") as caught:
            await das.exchange(target, p.COA_REQUEST, ATTRS, "t")
    assert not isinstance(caught.value, UnreachableError)
    assert len(server.received) == 3


async def test_the_host_is_asked_only_when_the_tries_before_the_last_went_unanswered(nas: Any) -> None:
    """A NAS that answers the first try is never sent a TCP connection: nothing extra at month-end."""
    _, target = await nas(lambda req, raw: [reply(req, p.DISCONNECT_ACK)])
    with tcp_listener(target.port) as accepted:
        await das.exchange(target, p.DISCONNECT_REQUEST, ATTRS, "t")
        assert await das.host_answers("127.0.0.1", target.port, 1.0) == "accepted"
        assert accepted() == 1  # the look above, and none from the exchange


async def test_a_closed_port_is_unreachable_with_the_hint_to_enable_it() -> None:
    target = das.Target("127.0.0.1", closed_udp_port(), SECRET, "nas-secret", timeout=1.0, retries=0)
    with pytest.raises(UnreachableError, match="accept=yes"):
        await das.exchange(target, p.DISCONNECT_REQUEST, ATTRS, "t")


def test_requests_carry_a_message_authenticator_and_the_attributes() -> None:
    request = das.build(p.COA_REQUEST, SECRET, (*ATTRS, ("Mikrotik-Address-List", "suspended")))
    decoded = CoAPacket(packet=request.RequestPacket(), secret=SECRET, dict=das.dictionary())
    assert decoded.VerifyCoARequest()
    assert decoded.verify_message_authenticator(secret=SECRET)
    assert decoded["Mikrotik-Address-List"] == ["suspended"] and decoded["User-Name"] == ["alice"]


@pytest.mark.parametrize("attrs", [(("No-Such-Attribute", "x"),), (("Framed-IP-Address", "not-an-ip"),),
                                   (("Session-Timeout", "soon"),)])
def test_attributes_that_cannot_be_sent_are_config_errors(attrs: p.Attributes) -> None:
    with pytest.raises(ConfigError):
        das.check_attributes(attrs)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=st.binary(max_size=300), body=st.binary(max_size=300), code=st.sampled_from([41, 42, 44, 0, 255]),
       framed=st.booleans())
def test_any_datagram_is_judged_without_raising(raw: bytes, body: bytes, code: int, framed: bool) -> None:
    """Arbitrary bytes, or a header that fits the request around arbitrary attributes: a Reply or None."""
    request = das.build(p.DISCONNECT_REQUEST, SECRET, ATTRS)
    request.RequestPacket()
    data = bytes([code, request.id]) + (20 + len(body)).to_bytes(2, "big") + bytes(16) + body if framed else raw
    assert das.judge(request, data) is None
