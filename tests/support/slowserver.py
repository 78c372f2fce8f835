"""Network ends that misbehave on purpose, for timeout and unreachability tests on loopback.

`SlowServer` accepts TCP connections and reads whatever the client sends, but never answers: a
client must give up on its own timeout (an HTTP request, an SSH banner, a TLS handshake).
`refusing_port()` holds a bound but not listening TCP socket, so a connection to it is refused
and no other test can take the port while it is held.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator


class SlowServer:
    def __init__(self) -> None:
        self.accepted = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.port = 0

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> SlowServer:
        self._server = await asyncio.start_server(self._serve, host, port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        for writer in list(self._writers):
            writer.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self._writers.add(writer)
        try:
            while await reader.read(65536):  # swallow the request, answer nothing
                pass
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()


@contextlib.contextmanager
def refusing_port(host: str = "127.0.0.1") -> Iterator[int]:
    """A TCP port on `host` where connections are refused, held for the duration of the block."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind((host, 0))
        yield sock.getsockname()[1]
    finally:
        sock.close()
