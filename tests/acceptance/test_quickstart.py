"""The README's quick start, run as written against a cluster of its own (its roles and database are
cluster-wide names): the database and roles are made, the owner initialises it, the agent runs as the
worker and applies the command."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.support.pg import Cluster

pytestmark = pytest.mark.acceptance

ROOT = Path(__file__).resolve().parents[2]


def quick_start() -> list[str]:
    """The commands of the README's quick start block: comments (whole lines, or after two spaces)
    dropped, continuation lines joined."""
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Quick start against your own Postgres\n.*?```sh\n(.*?)```", readme, re.S)
    assert block, "the README has no quick start block"
    lines = block.group(1).replace("\\\n", " ").splitlines()
    return [re.sub(r"\s{2,}#.*$", "", ln) for ln in lines if ln.strip() and not ln.startswith("#")]


def test_the_readme_quick_start_works_as_written(tmp_path):
    if os.environ.get("AGENT_TEST_DSN"):
        pytest.skip("the quick start creates cluster-wide roles: it runs on a throwaway cluster only")
    cluster = Cluster()
    try:
        socket_dir = dict(p.split("=", 1) for p in urlsplit(cluster.dsn).query.split("&"))["host"]
        bindir = Path(sys.executable).parent
        script = [f"set -e; export PATH={bindir}:$PATH"]
        for line in quick_start():
            if line.startswith("python3 -m venv"):
                continue  # the test's own environment has the package
            line = line.replace("psql -U postgres", f"psql -X -q -h {socket_dir} -U postgres")
            line = line.replace("@db.example/agent", f"@/agent?host={socket_dir}")
            if line.rstrip().endswith("&"):  # the agent: started, left running until the state shows
                line = line.rstrip(" &") + f" > {tmp_path}/agentd.log 2>&1 & echo $! > {tmp_path}/agentd.pid"
            if line.startswith("agentctl state"):
                line = ("for i in $(seq 1 100); do agentctl state | grep -q 'router-1.*wifi.*on.*on' && break; "
                        "sleep 0.2; done; agentctl state")
            script.append(line)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AGENT_", "PG"))}
        env |= {"AGENT_REQUIRE_VPN": "false", "AGENT_HTTP_LISTEN": "", "AGENT_RECONCILE_SCHEDULE": "off"}
        done = subprocess.run(["bash", "-c", "\n".join(script)], env=env, capture_output=True, text=True,
                              timeout=240, cwd=tmp_path)
        pid = tmp_path / "agentd.pid"
        if pid.exists():  # the agent drains and stops on SIGTERM by itself
            subprocess.run(["kill", pid.read_text().strip()], check=False)
        log = (tmp_path / "agentd.log").read_text() if (tmp_path / "agentd.log").exists() else ""
        assert done.returncode == 0, done.stdout + done.stderr + log
        assert re.search(r"router-1\s+wifi\s+on\s+on", done.stdout), done.stdout
        assert "agent running" in log
    finally:
        cluster.close()
