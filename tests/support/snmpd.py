"""A real net-snmp `snmpd` managing the interfaces of a network namespace the test makes.

    test process (host namespace)                 namespace snmpNNN (made here, removed by close())
    UDP socket 127.0.0.1:<port>  --- fd 3 --->    snmpd -f -Lo -C -c <conf>   (systemd socket activation)
                                                  veth pairs <port name> <-> <port name>-p: the switch ports

The test process binds the agent's UDP socket on its own loopback and hands it to snmpd, which runs
inside the namespace (net-snmp is built with systemd support and adopts a socket passed in
LISTEN_FDS whose address matches `agentAddress`). So snmpd sees and changes only the namespace's
interfaces, the driver talks to it over loopback, and no address or interface is added to the host.
While snmpd is stopped the socket stays open: requests are queued and never answered, as from a
dead agent behind a firewall. Needs root (network namespaces, and snmpd's SET of ifAdminStatus).
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

SNMPD = "/usr/sbin/snmpd"
_counter = itertools.count()


def snmpd_available() -> str | None:
    """Why the snmpd tests cannot run here, or None."""
    if not Path(SNMPD).is_file():
        return f"{SNMPD} not installed (Debian package snmpd)"
    if shutil.which("ip") is None:
        return "ip not installed (Debian package iproute2)"
    if os.geteuid() != 0:
        return "not root (network namespaces and SET of ifAdminStatus need CAP_NET_ADMIN)"
    return None


def _run(*args: str) -> str:
    out = subprocess.run(args, capture_output=True, text=True, timeout=20)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {out.stderr.strip()}")
    return out.stdout


@dataclass
class V3User:
    name: str
    auth_key: str
    priv_key: str
    auth: str = "SHA"         # net-snmp's names: MD5, SHA, SHA-224, SHA-256, ...
    priv: str = "AES"         # DES, AES, AES-192, AES-256 (Blumenthal in this build)
    write: bool = True


@dataclass
class Snmpd:
    """snmpd in its own namespace; `ports` are the veth interfaces it manages."""

    ports: list[str] = field(default_factory=lambda: ["swp1", "swp2"])
    write_community: str = "rw-Comm-5b1d"
    read_community: str = "ro-Comm-93ac"
    users: list[V3User] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.ns = f"snmp{os.getpid() % 100000}{next(_counter)}"
        self._dir = Path(tempfile.mkdtemp(prefix="agent-snmpd-"))
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind(("127.0.0.1", 0))
        self.port: int = self._sock.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        self._proc: subprocess.Popen[bytes] | None = None
        self._made = False
        atexit.register(self.close)
        try:
            self._build()
            self.start()
        except Exception:
            self.close()
            raise

    def _build(self) -> None:
        _run("ip", "netns", "add", self.ns)
        self._made = True
        _run("ip", "-n", self.ns, "link", "set", "lo", "up")
        for name in self.ports:
            _run("ip", "-n", self.ns, "link", "add", name, "type", "veth", "peer", "name", f"{name}-p")
            _run("ip", "-n", self.ns, "link", "set", name, "up")
        (self._dir / "persist").mkdir()
        (self._dir / "snmpd.conf").write_text(self.config())

    def config(self) -> str:
        lines = [f"agentAddress udp:127.0.0.1:{self.port}",
                 f"persistentDir {self._dir / 'persist'}",
                 f"rwcommunity {self.write_community} 127.0.0.1",
                 f"rocommunity {self.read_community} 127.0.0.1"]
        for u in self.users:
            lines += [f"createUser {u.name} {u.auth} {u.auth_key} {u.priv} {u.priv_key}",
                      f"{'rwuser' if u.write else 'rouser'} {u.name} priv"]
        return "\n".join(lines) + "\n"

    def start(self) -> None:
        """Start snmpd on the socket; return once it has adopted it (its log says so)."""
        log = self._dir / "snmpd.log"
        log.write_text("")
        fd = self._sock.fileno()
        as_fd3 = "" if fd == 3 else f" 3<&{fd} {fd}<&-"  # LISTEN_FDS sockets start at fd 3 (bash: any fd number)
        script = (f"export LISTEN_PID=$$ LISTEN_FDS=1; exec ip netns exec {self.ns} {SNMPD} -f -Lo -C "
                  f"-c {self._dir / 'snmpd.conf'}{as_fd3}")
        with log.open("ab") as out:
            self._proc = subprocess.Popen(["bash", "-c", script], pass_fds=(fd,), stdout=out,
                                          stderr=subprocess.STDOUT, env={**os.environ, "MIBS": ""})
        deadline = time.monotonic() + 20
        while "NET-SNMP version" not in log.read_text(errors="replace"):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"snmpd did not start: {log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.02)

    def stop(self) -> None:
        """snmpd dies; its socket stays, so requests go unanswered."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(10)
        self._proc = None

    def is_up(self, name: str) -> bool:
        """The real admin state of a namespace interface: its UP flag, read with `ip`, not SNMP."""
        (link,) = json.loads(_run("ip", "-n", self.ns, "-j", "link", "show", name))
        return "UP" in link["flags"]

    def set_up(self, name: str, up: bool) -> None:
        _run("ip", "-n", self.ns, "link", "set", name, "up" if up else "down")

    def rename(self, name: str, new: str) -> None:
        """Rename an interface (down while renamed, as the kernel wants, then up again)."""
        _run("ip", "-n", self.ns, "link", "set", name, "down")
        _run("ip", "-n", self.ns, "link", "set", name, "name", new)
        _run("ip", "-n", self.ns, "link", "set", new, "up")

    def ifindex(self, name: str) -> int:
        (link,) = json.loads(_run("ip", "-n", self.ns, "-j", "link", "show", name))
        return int(link["ifindex"])

    def log(self) -> str:
        path = self._dir / "snmpd.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def close(self) -> None:
        self.stop()
        if self._made:
            subprocess.run(["ip", "netns", "del", self.ns], capture_output=True)
            self._made = False
        self._sock.close()
        shutil.rmtree(self._dir, ignore_errors=True)


@contextlib.contextmanager
def silent_udp() -> Iterator[int]:
    """A bound loopback UDP port that receives and never answers: a device too slow to reply."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


def closed_udp_port() -> int:
    """A loopback UDP port nothing listens on (the kernel answers port-unreachable)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
