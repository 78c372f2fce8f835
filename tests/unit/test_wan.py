"""The WAN-like link of tests/support/wan.py does what the field does: late, cut, reset, lost, doubled."""

from __future__ import annotations

import asyncio
import socket
import time
from functools import partial
from typing import cast

import pytest

from tests.support.wait import until
from tests.support.wan import TcpProxy, UdpRelay, in_thread


async def blob_server(payload: bytes) -> asyncio.Server:
    """A TCP server that writes `payload` in one write to whoever connects, then closes."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(payload)
        await writer.drain()
        writer.close()

    return await asyncio.start_server(serve, "127.0.0.1", 0)


async def connect(port: int) -> socket.socket:
    sock = socket.socket()
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return sock


async def test_one_write_of_the_device_arrives_as_separate_mtu_sized_segments() -> None:
    payload = bytes(range(256)) * 20  # 5120 bytes, one write on the device's side
    server = await blob_server(payload)
    released: asyncio.Queue[None] = asyncio.Queue()
    proxy = await TcpProxy(server.sockets[0].getsockname()[:2], latency=0.0, segment=1380,
                           step=released.get).start()
    loop = asyncio.get_running_loop()
    sock = await connect(proxy.port)
    try:
        received = []
        while chunk := await loop.sock_recv(sock, 65536):
            received.append(chunk)
            released.put_nowait(None)  # the next segment leaves only once this one was read alone
    finally:
        sock.close()
        await proxy.stop()
        server.close()
    assert b"".join(received) == payload
    assert [len(c) for c in received] == proxy.segments, "each segment was received alone"
    assert len(received) >= 4 and max(proxy.segments) == 1380  # 5120 bytes: at least 1380+1380+1380+980


async def test_the_reply_arrives_no_earlier_than_the_latency() -> None:
    server = await blob_server(b"hello")
    proxy = await TcpProxy(server.sockets[0].getsockname()[:2], latency=0.05).start()
    try:
        started = time.monotonic()
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        assert await reader.read() == b"hello"
        assert time.monotonic() - started >= 0.049  # asyncio may wake a timer up to its clock resolution early
        writer.close()
    finally:
        await proxy.stop()
        server.close()


async def test_a_connection_can_be_reset_in_the_middle_of_the_reply() -> None:
    payload = b"x" * 20000
    server = await blob_server(payload)
    proxy = await TcpProxy(server.sockets[0].getsockname()[:2], latency=0.0, gap=0.0, reset_after=5000).start()
    loop = asyncio.get_running_loop()
    sock = await connect(proxy.port)
    got = 0
    try:
        with pytest.raises(ConnectionResetError):
            while chunk := await loop.sock_recv(sock, 65536):
                got += len(chunk)
    finally:
        sock.close()
        await proxy.stop()
        server.close()
    assert got <= 5000 and proxy.resets == 1


async def test_a_refused_device_looks_refused_through_the_proxy() -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
        proxy = await TcpProxy(held.getsockname()[:2]).start()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            with pytest.raises(ConnectionResetError):
                while await reader.read(100):
                    pass
            writer.close()
        finally:
            await proxy.stop()


class Collect(asyncio.DatagramProtocol):
    def __init__(self, echo: bool) -> None:
        self.echo = echo
        self.got: list[bytes] = []
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.got.append(data)
        if self.echo and self.transport is not None:
            self.transport.sendto(data, addr)


async def udp(echo: bool, remote: tuple[str, int] | None = None) -> tuple[asyncio.DatagramTransport, Collect]:
    loop = asyncio.get_running_loop()
    if remote is None:
        transport, proto = await loop.create_datagram_endpoint(lambda: Collect(echo), local_addr=("127.0.0.1", 0))
    else:
        transport, proto = await loop.create_datagram_endpoint(lambda: Collect(echo), remote_addr=remote)
    return transport, proto


def passed(relay: UdpRelay, n: int) -> bool:
    return relay.stats["forwarded"] + relay.stats["dropped"] >= n


async def test_the_udp_relay_drops_and_duplicates_at_its_rates() -> None:
    device, at_device = await udp(echo=False)
    relay = await UdpRelay(device.get_extra_info("sockname"), delay=0.0, drop=0.2, duplicate=0.3, seed=11,
                           directions=("up",)).start()
    client, _ = await udp(echo=False, remote=(relay.host, relay.port))
    try:
        for i in range(1000):
            client.sendto(b"%d" % i)
            if i % 50 == 49:  # let the relay keep up: a full socket buffer would lose datagrams of its own
                await until(partial(passed, relay, i + 1), what="the relay to keep up")
        expected = relay.stats["forwarded"] + relay.stats["duplicated"]
        await until(lambda: len(at_device.got) >= expected, what="the relayed datagrams")
    finally:
        client.close()
        await relay.stop()
        device.close()
    assert relay.stats["forwarded"] + relay.stats["dropped"] == 1000
    assert 150 <= relay.stats["dropped"] <= 250, relay.stats             # 20 % of 1000
    assert 0.24 <= relay.stats["duplicated"] / relay.stats["forwarded"] <= 0.36, relay.stats  # 30 % of the rest
    assert len(at_device.got) == expected and len(set(at_device.got)) == relay.stats["forwarded"]


async def test_the_udp_relay_carries_replies_back_to_each_client() -> None:
    device, _ = await udp(echo=True)
    relay = await UdpRelay(device.get_extra_info("sockname"), delay=0.005, jitter=0.005).start()
    clients = [await udp(echo=False, remote=(relay.host, relay.port)) for _ in range(2)]
    try:
        for n, (transport, _) in enumerate(clients):
            transport.sendto(b"from %d" % n)
        await until(lambda: all(proto.got for _, proto in clients), what="the echoes")
        assert [proto.got for _, proto in clients] == [[b"from 0"], [b"from 1"]]
    finally:
        for transport, _ in clients:
            transport.close()
        await relay.stop()
        device.close()


def test_a_relay_in_a_thread_of_its_own_serves_a_test_that_blocks() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as device, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        device.bind(("127.0.0.1", 0))
        device.settimeout(10)
        client.settimeout(10)
        with in_thread(lambda: UdpRelay(device.getsockname(), delay=0.001, duplicate=1.0)) as relay:
            client.sendto(b"ping", (relay.host, relay.port))
            first, back_to = device.recvfrom(100)
            assert (first, device.recvfrom(100)[0]) == (b"ping", b"ping")  # duplicated on the way up
            device.sendto(b"pong", back_to)
            assert client.recvfrom(100)[0] == b"pong"
        assert relay.stats["duplicated"] >= 1


def test_the_udp_relay_refuses_rates_that_are_not_probabilities() -> None:
    with pytest.raises(ValueError, match="probabilities"):
        UdpRelay(("127.0.0.1", 1), drop=1.5)


async def test_stopping_the_proxy_with_a_connection_open_is_quiet(caplog: pytest.LogCaptureFixture) -> None:
    """A test ends (and stops its link) while a client still holds a connection: the proxy closes it
    without asyncio logging "Exception in callback" for its cancelled connection handler."""
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # the device says nothing until the client goes

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    proxy = await TcpProxy(server.sockets[0].getsockname()[:2]).start()
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        await until(lambda: proxy.connections == 1 and len(proxy._writers) == 2, what="the proxy connected upstream")
        await proxy.stop()
        assert await reader.read() == b""  # closed on the client
    finally:
        writer.close()
        server.close()
    assert [r.getMessage() for r in caplog.records if r.name == "asyncio"] == []
