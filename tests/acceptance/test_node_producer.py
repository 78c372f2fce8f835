"""The Node.js producer of docs/examples/node, run as it is: node-postgres installed with npm, logged
in as a member of agent_producer, a real agentd with a sim device settling what it sends."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.support.agents import agentctl, spawn_agentd
from tests.support.cluster import as_user, login_role
from tests.support.db import state

pytestmark = pytest.mark.acceptance

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "examples" / "node"
NEEDS = "needs Node.js and npm (Debian: apt-get install nodejs npm) and the npm registry"


@pytest.fixture(scope="session")
def node_producer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example in a directory of its own, its package.json's dependencies installed."""
    npm = shutil.which("npm")
    if shutil.which("node") is None or npm is None:
        pytest.skip(NEEDS)
    home = tmp_path_factory.mktemp("node-producer")
    for name in ("package.json", "enqueue.mjs"):
        shutil.copy(EXAMPLE / name, home / name)
    try:
        done = subprocess.run([npm, "install", "--no-audit", "--no-fund", "--prefer-offline"], cwd=home,
                              capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        pytest.skip(f"{NEEDS}: npm install timed out")
    if done.returncode != 0:
        pytest.skip(f"{NEEDS}: npm install failed: {done.stderr.strip()[-500:]}")
    return home


@pytest.fixture
async def producer_url(dsn: str) -> AsyncIterator[str]:
    agentctl(dsn, "device", "add", "router-1", "--driver", "sim", "--option", "latency=0.01")
    async with login_role(dsn, "agent_producer") as name:
        yield as_user(dsn, name)


def run_example(home: Path, url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["node", "enqueue.mjs", *args], cwd=home, capture_output=True, text=True, timeout=90,
                          env={**os.environ, "DATABASE_URL": url, "WAIT_MS": "60000"})


async def test_the_node_example_enqueues_hears_the_outcome_and_reads_the_status(node_producer, producer_url, dsn, db):
    agentd = spawn_agentd(dsn, poll_interval=60)
    try:
        done = run_example(node_producer, producer_url, "router-1", "pppoe:alice", "on", "invoice-42-paid")
    finally:
        agentd.send_signal(signal.SIGTERM)
        agentd.communicate(timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(done.stdout)
    msg_id = result["msg_id"]
    assert isinstance(msg_id, str) and msg_id.isdigit()  # node-postgres gives a bigint as a string
    assert {k: result["outcome"][k] for k in ("version", "kind", "device", "service", "request_id")} == \
        {"version": int(msg_id), "kind": "verified", "device": "router-1", "service": "pppoe:alice",
         "request_id": "invoice-42-paid"}
    assert {k: result["status"][k] for k in ("status", "kind", "version", "request_id")} == \
        {"status": "settled", "kind": "verified", "version": msg_id, "request_id": "invoice-42-paid"}
    row = await state(db, "router-1", "pppoe:alice")
    assert (row["desired"], row["observed"]) == ("on", "on")


@pytest.mark.parametrize(("args", "code", "said"), [
    (("router-404", "pppoe:alice", "on"), 3, "refused (P0002: drop the command): agent.enqueue: unknown device"),
    (("router-1", "pppoe:alice", "maybe"), 2, "refused (22023: fix the call): agent.enqueue: state must be"),
])
async def test_the_node_example_tells_a_refusal_by_its_sqlstate(node_producer, producer_url, db, args, code, said):
    done = run_example(node_producer, producer_url, *args)
    assert done.returncode == code, done.stdout + done.stderr
    assert said in done.stderr
    assert await db.fetchval("SELECT count(*) FROM pgmq.q_device_tasks") == 0
