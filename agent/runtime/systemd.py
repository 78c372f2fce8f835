"""systemd integration: sd_notify (READY, STATUS, WATCHDOG, STOPPING, RELOADING) and the journal.

Uses systemd-python where it is installed; otherwise speaks the notify protocol itself (one
datagram to $NOTIFY_SOCKET), so the agent behaves the same with or without the library, and
does nothing at all when not run by systemd.
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger("agent.runtime.systemd")

try:  # pragma: no cover - depends on the host
    from systemd import daemon as _sd_daemon
except ImportError:  # pragma: no cover
    _sd_daemon = None


class Notifier:
    def __init__(self) -> None:
        self.socket_path = os.environ.get("NOTIFY_SOCKET")
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        wanted = usec and usec.isdigit() and (not pid or pid == str(os.getpid()))
        self.watchdog_interval = int(usec) / 2e6 if wanted and usec else None  # ping at half the timeout
        self._last_status = ""

    @property
    def last_status(self) -> str:
        """The last STATUS= line (also what /status says while the agent starts)."""
        return self._last_status

    @property
    def enabled(self) -> bool:
        return bool(self.socket_path)

    def send(self, *fields: str) -> None:
        if not self.socket_path:
            return
        message = "\n".join(fields)
        if _sd_daemon is not None:
            _sd_daemon.notify(message)
            return
        address = self.socket_path
        if address.startswith("@"):
            address = "\0" + address[1:]
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.connect(address)
                sock.sendall(message.encode())
        except OSError as exc:
            log.warning("sd_notify failed: %s", exc, extra={"action": "notify_failed"})

    def ready(self, status: str) -> None:
        self._last_status = status
        self.send("READY=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        if status != self._last_status:
            self._last_status = status
            self.send(f"STATUS={status}")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    def stopping(self, status: str = "stopping") -> None:
        self.send("STOPPING=1", f"STATUS={status}")

    def reloading(self) -> None:
        self.send("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

