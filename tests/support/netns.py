"""A real WireGuard tunnel between two network namespaces the test makes, plus an empty one.

    agent side  (ns A)  wg A 10.77.0.1/24 --- veth 192.168.254.1 <-> .2 --- (ns B) wg B 10.77.0.2/24
                                                                          site network 10.88.0.0/24 on lo
    outside     (ns O)  nothing but lo: "the agent outside the VPN"

Addresses exist only inside these namespaces: nothing is ever sent from the host's namespace.
Userspace WireGuard (wireguard-go) needs no kernel module. Everything made here is removed by
close(), also when the test fails.
"""

from __future__ import annotations

import atexit
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

_counter = itertools.count()
SITE_NET = "10.88.0"
DEVICE_IP = f"{SITE_NET}.1"


def wireguard_available() -> str | None:
    """Why the tunnel tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "not root (network namespaces need CAP_NET_ADMIN)"
    for tool, package in (("ip", "iproute2"), ("wg", "wireguard-tools"), ("wireguard-go", "wireguard-go")):
        if shutil.which(tool) is None:
            return f"{tool} not installed (Debian package {package})"
    if not Path("/dev/net/tun").exists():
        return "/dev/net/tun unavailable"
    return None


def _run(*args: str, input: str | None = None) -> str:
    out = subprocess.run(args, input=input, capture_output=True, text=True, timeout=20)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {out.stderr.strip()}")
    return out.stdout


class Tunnel:
    def __init__(self) -> None:
        n = f"{os.getpid() % 100000}{next(_counter)}"
        self.a, self.b, self.outside = f"agA{n}", f"agB{n}", f"agO{n}"
        self.wg_a, self.wg_b = f"wa{n}", f"wb{n}"
        self._veth_a, self._veth_b = f"va{n}", f"vb{n}"
        self._procs: list[subprocess.Popen[bytes]] = []
        self._keys = Path(tempfile.mkdtemp(prefix="agent-wg-"))
        self._made: list[str] = []
        atexit.register(self.close)
        try:
            self._build()
        except Exception:
            self.close()
            raise

    def exec_args(self, ns: str) -> list[str]:
        return ["ip", "netns", "exec", ns]

    def _build(self) -> None:
        for ns in (self.a, self.b, self.outside):
            _run("ip", "netns", "add", ns)
            self._made.append(ns)
            _run("ip", "-n", ns, "link", "set", "lo", "up")
        _run("ip", "link", "add", self._veth_a, "type", "veth", "peer", "name", self._veth_b)
        _run("ip", "link", "set", self._veth_a, "netns", self.a)
        _run("ip", "link", "set", self._veth_b, "netns", self.b)
        for ns, dev, addr in ((self.a, self._veth_a, "192.168.254.1/30"), (self.b, self._veth_b, "192.168.254.2/30")):
            _run("ip", "-n", ns, "addr", "add", addr, "dev", dev)
            _run("ip", "-n", ns, "link", "set", dev, "up")
        keys = {side: self._keypair(side) for side in ("a", "b")}
        self.public_a, self.public_b = keys["a"][1], keys["b"][1]
        for ns, dev in ((self.a, self.wg_a), (self.b, self.wg_b)):
            env = {**os.environ, "WG_PROCESS_FOREGROUND": "1"}
            self._procs.append(subprocess.Popen([*self.exec_args(ns), "wireguard-go", dev], env=env,
                                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        self._wait_for_interfaces()
        self._set_peer(self.a, self.wg_a, keys["a"][0], 51820, self.public_b, "192.168.254.2:51821",
                       f"10.77.0.0/24,{SITE_NET}.0/24")
        self._set_peer(self.b, self.wg_b, keys["b"][0], 51821, self.public_a, "192.168.254.1:51820", "10.77.0.1/32")
        _run("ip", "-n", self.a, "addr", "add", "10.77.0.1/24", "dev", self.wg_a)
        _run("ip", "-n", self.b, "addr", "add", "10.77.0.2/24", "dev", self.wg_b)
        _run("ip", "-n", self.a, "link", "set", self.wg_a, "up")
        _run("ip", "-n", self.b, "link", "set", self.wg_b, "up")
        _run("ip", "-n", self.b, "addr", "add", f"{DEVICE_IP}/32", "dev", "lo")
        _run("ip", "-n", self.a, "route", "add", f"{SITE_NET}.0/24", "dev", self.wg_a)

    def _keypair(self, side: str) -> tuple[Path, str]:
        private = self._keys / side
        private.touch(mode=0o600)
        private.write_text(_run("wg", "genkey"))
        return private, _run("wg", "pubkey", input=private.read_text()).strip()

    def _set_peer(self, ns: str, dev: str, key: Path, port: int, peer: str, endpoint: str, allowed: str) -> None:
        _run(*self.exec_args(ns), "wg", "set", dev, "private-key", str(key), "listen-port", str(port),
             "peer", peer, "endpoint", endpoint, "allowed-ips", allowed, "persistent-keepalive", "1")

    def _wait_for_interfaces(self) -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            links = _run("ip", "-n", self.a, "link") + _run("ip", "-n", self.b, "link")
            if self.wg_a in links and self.wg_b in links:
                return
            time.sleep(0.05)
        raise RuntimeError("wireguard-go did not create its interfaces")

    def start_device(self, port: int, names: list[str]) -> None:
        """The simulated RouterOS-like HTTP device on the site network, inside ns B (secrets start disabled)."""
        proc = subprocess.Popen([*self.exec_args(self.b), sys.executable, "-m", "tests.support.httpdevice",
                                 DEVICE_IP, str(port), *names], cwd=REPO, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        self._procs.append(proc)  # type: ignore[arg-type]
        self.device = proc
        line = proc.stdout.readline() if proc.stdout else ""
        if "listening" not in line:
            raise RuntimeError(f"simulated device did not start: {line}{proc.stdout.read() if proc.stdout else ''}")

    def stop_device(self) -> None:
        """The device dies; the tunnel and its peer stay healthy."""
        self.device.kill()
        self.device.wait(5)

    def device_secrets(self, port: int) -> dict[str, str]:
        """The device's state, asked from inside the site namespace (never from the host's)."""
        code = ("import json, urllib.request; print(urllib.request.urlopen("
                f"'http://{DEVICE_IP}:{port}/_control', timeout=5).read().decode())")
        return json.loads(_run(*self.exec_args(self.b), sys.executable, "-c", code))["secrets"]

    def cut_peer(self) -> None:
        """The site forgets the agent's peer: packets from A are dropped there."""
        _run(*self.exec_args(self.b), "wg", "set", self.wg_b, "peer", self.public_a, "remove")

    def restore_peer(self) -> None:
        _run(*self.exec_args(self.b), "wg", "set", self.wg_b, "peer", self.public_a,
             "endpoint", "192.168.254.1:51820", "allowed-ips", "10.77.0.1/32", "persistent-keepalive", "1")

    def link_down(self) -> None:
        _run("ip", "-n", self.a, "link", "set", self.wg_a, "down")

    def link_up(self) -> None:
        _run("ip", "-n", self.a, "link", "set", self.wg_a, "up")
        _run("ip", "-n", self.a, "route", "replace", f"{SITE_NET}.0/24", "dev", self.wg_a)

    def close(self) -> None:
        for proc in self._procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
        self._procs.clear()
        for ns in self._made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self._made.clear()
        for dev in (self.wg_a, self.wg_b):
            Path(f"/var/run/wireguard/{dev}.sock").unlink(missing_ok=True)
        shutil.rmtree(self._keys, ignore_errors=True)
