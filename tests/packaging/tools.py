"""The programs the compose tests run, and the Debian package of each: one list for `.ci/packaging`'s
check before it starts and for the tests' own.

podman runs some of them itself, from places outside PATH: netavark and aardvark-dns (from
/usr/lib/podman) set up the compose networks and their names, and netavark runs `iptables` (in
/usr/sbin). When one is missing, `compose up` does not fail: it hangs until its timeout. So the
check names what is missing first. Standard library only: `.ci/packaging` runs it with the system
python3 (`python3 tests/packaging/tools.py`) before any venv exists; it prints what is missing, and
exits 1 when podman is there without what it runs (a machine without podman skips those tests).
"""

from __future__ import annotations

import os
import shutil
import sys

COMPOSE = {  # program -> Debian package
    "podman": "podman",
    "buildah": "buildah",
    "runc": "runc",
    "netavark": "netavark",
    "aardvark-dns": "aardvark-dns",
    "iptables": "iptables",
    "debootstrap": "debootstrap",
    "wg": "wireguard-tools",
}
_WHERE = ("/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/lib/podman", "/usr/libexec/podman")


def missing(programs: dict[str, str] = COMPOSE) -> dict[str, str]:
    """The programs not found (in PATH, the sbin directories or podman's helper directories)."""
    path = os.pathsep.join([os.environ.get("PATH", ""), *_WHERE])
    return {prog: pkg for prog, pkg in programs.items() if shutil.which(prog, path=path) is None}


def message(absent: dict[str, str]) -> str:
    packages = " ".join(dict.fromkeys(absent.values()))
    return (f"the compose tests need {', '.join(absent)}, not found on this machine "
            f"(without them `compose up` hangs instead of failing); install: "
            f"apt-get install -y --no-install-recommends {packages}")


def verdict(absent: dict[str, str]) -> str | None:
    """What the tests will do: None (run), "skip" (no podman: a machine without containers), or
    "fail" (podman without what it runs: `compose up` would hang)."""
    if not absent:
        return None
    return "skip" if "podman" in absent else "fail"


if __name__ == "__main__":
    absent = missing()
    if (what := verdict(absent)) is not None:
        print(f"{message(absent)}{'; the container tests are skipped' if what == 'skip' else ''}", file=sys.stderr)
    sys.exit(1 if what == "fail" else 0)
