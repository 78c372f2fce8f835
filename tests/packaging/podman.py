"""podman, buildah and podman-compose as this machine runs them (runc, cgroupfs, explicit ulimits).

Every call goes through one containers.conf written for the test, so podman-compose's own podman
calls get the same runtime settings. Everything made is recorded and removed by `close()`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BASE_IMAGE = "docker.io/library/debian:bookworm-slim"
ULIMITS = ["--ulimit", "nproc=32768:32768", "--ulimit", "nofile=20000:20000"]
CONTAINERS_CONF = """[containers]
default_ulimits = ["nproc=32768:32768", "nofile=1024:1024"]
log_driver = "k8s-file"
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
"""
PODMAN_COMPOSE = "podman-compose==1.6.*"
COMPOSE_VENV = ROOT / "build" / "packaging-venv"


class Podman:
    def __init__(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="agent-containers-"))
        conf = self.tmp / "containers.conf"
        conf.write_text(CONTAINERS_CONF)
        self.env = {**os.environ, "CONTAINERS_CONF": str(conf)}
        self.images: list[str] = []

    def run(
        self,
        *args: str,
        check: bool = True,
        timeout: float = 300,
        env: dict[str, str] | None = None,
        tool: str = "podman",
    ) -> subprocess.CompletedProcess[str]:
        out = subprocess.run(
            [tool, *args], capture_output=True, text=True, timeout=timeout, env={**self.env, **(env or {})}
        )
        if check and out.returncode != 0:
            raise AssertionError(
                f"{tool} {' '.join(args)} -> {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
            )
        return out

    def image_exists(self, ref: str) -> bool:
        return self.run("image", "exists", ref, check=False).returncode == 0

    def ensure_base_image(self, mirror: str) -> None:
        """A Debian base from the package archive, imported as the tag the Dockerfiles name."""
        if self.image_exists(BASE_IMAGE):
            return
        rootfs = self.tmp / "rootfs"
        subprocess.run(
            ["debootstrap", "--variant=minbase", "bookworm", str(rootfs), mirror],
            check=True,
            capture_output=True,
            timeout=600,
        )
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        subprocess.run(
            ["podman", "import", "-", BASE_IMAGE],
            stdin=tar.stdout,
            check=True,
            capture_output=True,
            env=self.env,
            timeout=600,
        )
        tar.wait()
        shutil.rmtree(rootfs, ignore_errors=True)
        self.images.append(BASE_IMAGE)

    def build(self, tag: str, context: Path, containerfile: Path | None = None) -> None:
        self.images.insert(0, tag)  # removed before the base they are built on
        self.run(
            "bud",
            "--isolation",
            "chroot",
            "--format",
            "docker",
            *ULIMITS,
            "-t",
            tag,
            "-f",
            str(containerfile or context / "Containerfile"),
            str(context),
            tool="buildah",
            timeout=900,
        )

    def build_agent_image(self, tag: str) -> None:
        self.images.insert(0, tag)
        out = subprocess.run(
            [str(ROOT / "scripts" / "build-image"), tag],
            capture_output=True,
            text=True,
            timeout=900,
            cwd=ROOT,
            env={**self.env, "BUILDER": "buildah", "BUILD_OPTS": " ".join(["--isolation", "chroot", *ULIMITS])},
        )
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]

    def inspect(self, name: str) -> dict:
        return json.loads(self.run("inspect", name).stdout)[0]

    def healthy(self, name: str) -> bool:
        """Run the container's health check now (no systemd timers here) and say whether it passed."""
        return self.run("healthcheck", "run", name, check=False, timeout=60).returncode == 0

    def wait_healthy(self, name: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.healthy(name):
            if time.monotonic() > deadline:
                logs = self.run("logs", "--tail", "30", name, check=False)
                raise AssertionError(f"{name} not healthy after {timeout}s\n{logs.stdout}{logs.stderr}")
            time.sleep(1)  # the health check itself is the condition; this only paces its runs

    def close(self) -> None:
        for ref in self.images:
            self.run("rmi", "-f", ref, check=False)
        shutil.rmtree(self.tmp, ignore_errors=True)


def podman_compose() -> list[str]:
    """podman-compose from PyPI (Debian's 1.0.3 has no network_mode: service:), in a venv under build/."""
    exe = COMPOSE_VENV / "bin" / "podman-compose"
    if not exe.exists():
        subprocess.run([sys.executable, "-m", "venv", str(COMPOSE_VENV)], check=True, timeout=120)
        subprocess.run([str(COMPOSE_VENV / "bin" / "pip"), "install", "-q", PODMAN_COMPOSE], check=True, timeout=300)
    return [str(exe)]
