"""A WAN-like link on loopback: a TCP proxy that delivers late and in segments, and a UDP relay
that delays, drops and duplicates. Loopback hands a reply over in one piece and never loses a
packet; the field (a VPN with MTU ~1420) does neither. `tc netem` needs kernel modules these
machines lack, so the tests put one of these between a client and a device stand-in.

TCP:

    proxy = await TcpProxy(("127.0.0.1", device_port), latency=0.01, segment=1380, gap=0.001).start()
    proxy.address          # "127.0.0.1:<port>": point the client here instead of at the device
    proxy.reset_after = 4000   # optional: reset each connection after 4000 bytes of reply
    await proxy.stop()

Every chunk read from either side is delivered `latency` seconds after it arrived, cut into
`segment`-byte writes `gap` seconds apart (TCP_NODELAY, drained one by one, so the reader's
receive calls see the pieces). Order is kept per direction. With `reset_after`, a connection is
aborted with a TCP RST to the client once that many bytes of reply (device to client) have passed.
Counters: `connections`, `resets`, `segments` (the sizes written to clients, in order).

UDP:

    relay = await UdpRelay(("127.0.0.1", device_port), delay=0.01, jitter=0.005,
                           drop=0.1, duplicate=0.1, seed=7).start()
    relay.address          # "127.0.0.1:<port>"; relay.host, relay.port
    relay.stats            # {"forwarded", "dropped", "duplicated"}: datagrams, both directions
    await relay.stop()

Each datagram (either way) is dropped with probability `drop`; the others are delivered after
`delay` plus a uniform `jitter` (so datagrams can overtake each other), and a delivered one is sent
twice with probability `duplicate` (the copy `dup_gap` seconds later). The random choices come
from `random.Random(seed)`: a run can be repeated. `directions` limits the harm to "up" (client to
device) or "down" (device to client); the default is both. Each client address gets its own
socket towards the device, so replies find their way back. Both classes run on the running
asyncio loop; start() binds to an ephemeral port on `host` (default 127.0.0.1), and both are also
async context managers (`async with UdpRelay(...) as relay:`).

The link works only while its loop runs: with agentd as a subprocess, wait for it with
`await asyncio.to_thread(proc.communicate)` or `tests.support.wait.until`, never a blocking call on
the test's loop. A synchronous test (or one that must block) runs the link in a thread of its own:

    with in_thread(lambda: UdpRelay(("127.0.0.1", radius_port), drop=0.1, seed=3)) as relay:
        ...  # relay.address, relay.stats; stopped at the end of the block
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
import socket
import struct
import threading
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar, cast

MTU_SEGMENT = 1380  # a WireGuard MTU of 1420 less IP and TCP headers
Link = TypeVar("Link", "TcpProxy", "UdpRelay")


def _abort_with_reset(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class TcpProxy:
    def __init__(self, upstream: tuple[str, int], latency: float = 0.01, segment: int = MTU_SEGMENT,
                 gap: float = 0.001, reset_after: int | None = None,
                 step: Callable[[], Awaitable[None]] | None = None) -> None:
        """`step`, when given, is awaited between two segments instead of sleeping `gap` (a test
        uses it to hold each segment until it has seen the previous one arrive alone)."""
        self.upstream = upstream
        self.latency = latency
        self.segment = segment
        self.gap = gap
        self.reset_after = reset_after
        self.step = step
        self.connections = 0
        self.resets = 0
        self.segments: list[int] = []
        self.host = "127.0.0.1"
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def address(self) -> str:
        """host:port to point a client at (an IPv6 host in brackets)."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    async def start(self, host: str = "127.0.0.1") -> TcpProxy:
        self._server = await asyncio.start_server(self._accept, host, 0)
        self.host, self.port = host, self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def __aenter__(self) -> TcpProxy:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        """One client's connection, until either side ends it or `stop` cancels it. Cancelled, it ends
        quietly: Python 3.11's start_server logs "Exception in callback" for a handler that ends
        cancelled, noise in the log of every test that stops its link with a connection open."""
        with contextlib.suppress(asyncio.CancelledError):
            await self._relay(client_r, client_w)

    async def _relay(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self.connections += 1
        if (task := asyncio.current_task()) is not None:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        self._writers.add(client_w)
        try:
            up_r, up_w = await asyncio.open_connection(*self.upstream)
        except OSError:
            _abort_with_reset(client_w)  # as the far end would: refused
            self._writers.discard(client_w)
            return
        self._writers.add(up_w)
        for w in (client_w, up_w):
            if (sock := w.get_extra_info("socket")) is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pipes = [asyncio.ensure_future(self._pipe(client_r, up_w, down=False, client=client_w)),
                 asyncio.ensure_future(self._pipe(up_r, client_w, down=True, client=client_w))]
        try:
            await asyncio.wait(pipes, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            for pipe in pipes:
                pipe.cancel()
            await asyncio.gather(*pipes, return_exceptions=True)
            for w in (client_w, up_w):
                self._writers.discard(w)
                w.transport.abort()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, down: bool,
                    client: asyncio.StreamWriter) -> None:
        """Read from one side, deliver to the other after the latency, in segments."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        sender = asyncio.ensure_future(self._send(queue, writer, down, client))
        try:
            while True:
                try:
                    data = await reader.read(65536)
                except OSError:
                    data = b""
                queue.put_nowait((loop.time() + self.latency, data))
                if not data:
                    break
            await sender
        finally:
            sender.cancel()

    async def _send(self, queue: asyncio.Queue[tuple[float, bytes]], writer: asyncio.StreamWriter, down: bool,
                    client: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        passed = 0
        while True:
            due, data = await queue.get()
            if (wait := due - loop.time()) > 0:
                await asyncio.sleep(wait)
            if not data:
                if writer.can_write_eof():
                    with contextlib.suppress(OSError):
                        writer.write_eof()
                return
            for start in range(0, len(data), self.segment):
                piece = data[start:start + self.segment]
                if down and self.reset_after is not None and passed + len(piece) > self.reset_after:
                    if (rest := self.reset_after - passed) > 0:
                        writer.write(piece[:rest])
                        await writer.drain()
                    self.resets += 1
                    _abort_with_reset(client)
                    raise ConnectionResetError("reset by the WAN proxy (reset_after)")
                if start:
                    await (self.step() if self.step is not None else asyncio.sleep(self.gap))
                writer.write(piece)
                await writer.drain()
                passed += len(piece)
                if down:
                    self.segments.append(len(piece))


class _Upstream(asyncio.DatagramProtocol):
    """The relay's socket towards the device for one client: replies go back to that client."""

    def __init__(self, relay: UdpRelay, client: tuple[str, int]) -> None:
        self.relay = relay
        self.client = client
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.relay._pass(data, "down", lambda d: self.relay._downstream_send(d, self.client))

    def error_received(self, exc: Exception) -> None:  # e.g. ICMP port unreachable: as lost on the way
        pass


class _Listener(asyncio.DatagramProtocol):
    def __init__(self, relay: UdpRelay) -> None:
        self.relay = relay

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.relay._from_client(data, addr)

    def error_received(self, exc: Exception) -> None:
        pass


class UdpRelay:
    def __init__(self, upstream: tuple[str, int], delay: float = 0.01, jitter: float = 0.0, drop: float = 0.0,
                 duplicate: float = 0.0, seed: int = 0, dup_gap: float = 0.001,
                 directions: tuple[str, ...] = ("up", "down")) -> None:
        if not (0.0 <= drop <= 1.0 and 0.0 <= duplicate <= 1.0) or delay < 0 or jitter < 0:
            raise ValueError("drop and duplicate are probabilities in [0, 1]; delay and jitter are >= 0 seconds")
        self.upstream = upstream
        self.delay = delay
        self.jitter = jitter
        self.drop = drop
        self.duplicate = duplicate
        self.dup_gap = dup_gap
        self.directions = directions
        self.random = random.Random(seed)
        self.stats = {"forwarded": 0, "dropped": 0, "duplicated": 0}
        self.host = "127.0.0.1"
        self.port = 0
        self._listener: asyncio.DatagramTransport | None = None
        self._upstreams: dict[tuple[str, int], _Upstream] = {}
        self._pending: dict[tuple[str, int], list[bytes]] = {}
        self._timers: set[asyncio.TimerHandle] = set()

    @property
    def address(self) -> str:
        """host:port to point a client at (an IPv6 host in brackets)."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    async def start(self, host: str = "127.0.0.1") -> UdpRelay:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(lambda: _Listener(self), local_addr=(host, 0))
        self._listener = transport
        self.host, self.port = host, transport.get_extra_info("sockname")[1]
        return self

    async def stop(self) -> None:
        for timer in list(self._timers):
            timer.cancel()
        self._timers.clear()
        for up in self._upstreams.values():
            if up.transport is not None:
                up.transport.close()
        self._upstreams.clear()
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    async def __aenter__(self) -> UdpRelay:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _from_client(self, data: bytes, client: tuple[str, int]) -> None:
        up = self._upstreams.get(client)
        if up is None:
            fresh = self._upstreams[client] = _Upstream(self, client)
            self._pending[client] = []
            loop = asyncio.get_running_loop()
            task = loop.create_task(loop.create_datagram_endpoint(lambda: fresh, remote_addr=self.upstream))
            task.add_done_callback(functools.partial(self._opened, client=client))
        self._pass(data, "up", lambda d: self._upstream_send(d, client))

    def _opened(self, task: asyncio.Task[Any], client: tuple[str, int]) -> None:
        if task.cancelled() or task.exception() is not None:
            self._upstreams.pop(client, None)
            self._pending.pop(client, None)
            return
        for data in self._pending.pop(client, []):
            self._upstream_send(data, client)

    def _upstream_send(self, data: bytes, client: tuple[str, int]) -> None:
        up = self._upstreams.get(client)
        if up is None:
            return
        if up.transport is None:
            self._pending.setdefault(client, []).append(data)
            return
        up.transport.sendto(data)

    def _downstream_send(self, data: bytes, client: tuple[str, int]) -> None:
        if self._listener is not None:
            self._listener.sendto(data, client)

    def _pass(self, data: bytes, direction: str, send: Callable[[bytes], None]) -> None:
        """Drop, delay and duplicate one datagram going `direction` ("up" or "down")."""
        if direction not in self.directions:
            self._later(0.0, send, data)
            return
        if self.random.random() < self.drop:
            self.stats["dropped"] += 1
            return
        self.stats["forwarded"] += 1
        wait = self.delay + (self.random.uniform(0.0, self.jitter) if self.jitter else 0.0)
        self._later(wait, send, data)
        if self.random.random() < self.duplicate:
            self.stats["duplicated"] += 1
            self._later(wait + self.dup_gap, send, data)

    def _later(self, wait: float, send: Callable[[bytes], None], data: bytes) -> None:
        loop = asyncio.get_running_loop()
        timer: asyncio.TimerHandle

        def fire() -> None:
            self._timers.discard(timer)
            send(data)

        timer = loop.call_later(wait, fire)
        self._timers.add(timer)


@contextlib.contextmanager
def in_thread(make: Callable[[], Link], host: str = "127.0.0.1") -> Iterator[Link]:
    """A TcpProxy or UdpRelay (built by `make`) started on an event loop in a thread of its own, for
    tests that block; stopped, and its thread ended, when the block ends."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="wan-link", daemon=True)
    thread.start()

    async def build() -> Link:
        return await make().start(host)  # type: ignore[return-value]

    try:
        link = asyncio.run_coroutine_threadsafe(build(), loop).result(timeout=10)
        try:
            yield link
        finally:
            asyncio.run_coroutine_threadsafe(link.stop(), loop).result(timeout=10)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()
