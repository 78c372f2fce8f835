"""A real OpenSSH `sshd` on a loopback port, for the ssh driver's tests.

    Sshd(dir, authorized=[public key line])  ->  /usr/sbin/sshd -D -e -f <dir>/sshd_config
                                                 127.0.0.1:<free port>, throwaway ed25519 host key,
                                                 AuthorizedKeysFile <dir>/authorized_keys, login as root

Each accepted connection is a child process of the listener, so the test can count logins (the
log's "Accepted publickey" lines), cut live connections (kill those children) and restart the whole
server on the same port. `SetEnv PATH=...` puts test tools (a fake systemctl) first on the sessions'
PATH. Needs root: sshd switches to the login user and uses its privilege-separation directory
/run/sshd, made here when missing.
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import asyncssh

SSHD = "/usr/sbin/sshd"
PRIVSEP_DIR = Path("/run/sshd")


def sshd_available() -> str | None:
    """Why the sshd tests cannot run here, or None."""
    if not Path(SSHD).is_file():
        return f"{SSHD} not installed (Debian package openssh-server)"
    if os.geteuid() != 0:
        return "not root (sshd must switch to the login user; the tests log in as root)"
    return None


def keypair(path: Path, comment: str = "agent-test") -> asyncssh.SSHKey:
    """A fresh ed25519 key: the private half written to `path` (OpenSSH format, mode 0600)."""
    key = asyncssh.generate_private_key("ssh-ed25519", comment=comment)
    path.write_bytes(key.export_private_key("openssh"))
    path.chmod(0o600)
    return key


def public_line(key: asyncssh.SSHKey) -> str:
    """The OpenSSH public key line of a key (`ssh-ed25519 AAAA... comment`)."""
    return key.export_public_key("openssh").decode().strip()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _children(pid: int) -> list[int]:
    """Direct children of `pid`, from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def _descendants(pid: int) -> list[int]:
    """Every process below `pid`, parents before their children."""
    out: list[int] = []
    todo = _children(pid)
    while todo:
        child = todo.pop(0)
        out.append(child)
        todo += _children(child)
    return out


class Sshd:
    def __init__(self, directory: Path, authorized: list[str], path_prepend: str | None = None) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.host_key = keypair(self.dir / "host_ed25519", "test-host")
        (self.dir / "authorized_keys").write_text("".join(line + "\n" for line in authorized))
        self.path_prepend = path_prepend
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._logs: list[Path] = []
        atexit.register(self.stop)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def host_key_line(self) -> str:
        return public_line(self.host_key)

    def write_known_hosts(self, path: Path) -> Path:
        path.write_text(f"[127.0.0.1]:{self.port} {self.host_key_line}\n")
        return path

    def config(self) -> str:
        lines = [f"Port {self.port}", "ListenAddress 127.0.0.1", f"HostKey {self.dir / 'host_ed25519'}",
                 f"AuthorizedKeysFile {self.dir / 'authorized_keys'}", f"PidFile {self.dir / 'sshd.pid'}",
                 "UsePAM no", "StrictModes no", "PermitRootLogin prohibit-password",
                 "PasswordAuthentication no", "KbdInteractiveAuthentication no", "LogLevel INFO",
                 "MaxStartups 100", "MaxSessions 100"]
        if self.path_prepend:
            lines.append(f"SetEnv PATH={self.path_prepend}:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin")
        return "\n".join(lines) + "\n"

    def start(self, same_port: bool = False, deadline: float = 20.0) -> Sshd:
        """Start the listener; return once its log says it listens (a few tries for a free port)."""
        PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)
        for _attempt in range(5):
            if not same_port or not self.port:
                self.port = _free_port()
            if self._spawn(deadline):
                return self
            if same_port:
                break
        raise RuntimeError(f"sshd did not start: {self.log()[-2000:]}")

    def _spawn(self, deadline: float) -> bool:
        (self.dir / "sshd_config").write_text(self.config())
        log = self.dir / f"sshd-{len(self._logs)}.log"
        self._logs.append(log)
        with log.open("wb") as out:
            self._proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(self.dir / "sshd_config")],
                                          stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        end = time.monotonic() + deadline
        while "Server listening on" not in log.read_text(errors="replace"):
            if self._proc.poll() is not None or time.monotonic() > end:
                self._kill_listener()
                return False
            time.sleep(0.02)
        return True

    def drop_connections(self) -> int:
        """Kill every live connection (the listener's children and below); how many there were."""
        if self._proc is None:
            return 0
        sessions = _children(self._proc.pid)
        for pid in reversed(_descendants(self._proc.pid)):
            _signal(pid, signal.SIGKILL)
        return len(sessions)

    def connections(self) -> int:
        """Live connections: the listener's children (one per accepted connection)."""
        return len(_children(self._proc.pid)) if self._proc is not None else 0

    def accepted(self) -> int:
        """Logins since the first start, from the logs (`Accepted publickey for ...`)."""
        return self.log().count("Accepted publickey for")

    def log(self) -> str:
        return "".join(p.read_text(errors="replace") for p in self._logs if p.exists())

    def stop(self) -> None:
        """The listener and every connection gone."""
        self.drop_connections()
        self._kill_listener()

    def _kill_listener(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(10)
        self._proc = None


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
