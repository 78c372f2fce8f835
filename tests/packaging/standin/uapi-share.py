"""Offer wireguard-go's UAPI socket (root-only, and wireguard-go shuts down if its mode is touched)
as /shared/<if>.sock for the non-root agent in the other container. A stand-in shortcut: kernel
WireGuard is read over netlink in the shared network namespace instead."""

import os
import socket
import socketserver
import sys
import threading

name = sys.argv[1]
target = f"/var/run/wireguard/{name}.sock"
path = f"/shared/{name}.sock"


def pump(src: socket.socket, dst: socket.socket) -> None:
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


class Forward(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        up = socket.socket(socket.AF_UNIX)
        up.connect(target)
        t = threading.Thread(target=pump, args=(up, self.request), daemon=True)
        t.start()
        pump(self.request, up)
        t.join(5)
        up.close()


if os.path.exists(path):
    os.unlink(path)
os.umask(0)
server = socketserver.ThreadingUnixStreamServer(path, Forward)
server.daemon_threads = True
server.serve_forever()
