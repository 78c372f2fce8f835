"""A loopback TCP port forwarding to a Unix socket, in a thread of its own.

The throwaway Postgres of the test suite listens only on a socket inside its private data directory;
the installed agentd runs as its own service user, which cannot enter that directory. It reaches the
server the way production does, over TCP.
"""

from __future__ import annotations

import socket
import socketserver
import threading
from urllib.parse import parse_qs, urlsplit, urlunsplit


class _Forward(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        upstream.connect(self.server.target)  # type: ignore[attr-defined]
        pump = threading.Thread(target=_copy, args=(upstream, self.request), daemon=True)
        pump.start()
        _copy(self.request, upstream)
        pump.join(5)
        upstream.close()


def _copy(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass


class TcpToUnix(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, dsn: str) -> None:
        """Forward 127.0.0.1:<free port> to the Unix socket of a libpq URL with ?host=<dir>."""
        parts = urlsplit(dsn)
        host_dir = parse_qs(parts.query)["host"][0]
        self.target = f"{host_dir}/.s.PGSQL.{parts.port or 5432}"
        super().__init__(("127.0.0.1", 0), _Forward)
        self.port = self.server_address[1]
        self.dsn = urlunsplit(parts._replace(netloc=f"{parts.username or 'postgres'}@127.0.0.1:{self.port}", query=""))
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.shutdown()
        self.server_close()
        self._thread.join(5)
