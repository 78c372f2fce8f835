"""The container image in the compose stack, brought up for real with podman and podman-compose.

compose.yml as shipped, with tests/packaging/compose.test.yml over it for what cannot be pulled here
(Postgres, the WireGuard image) and for the remote site: a second WireGuard peer with an HTTP device
behind it, reached only through the tunnel. Every container, network, volume and image made is
removed at the end.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.packaging import tools
from tests.packaging.podman import ROOT, Podman, podman_compose

pytestmark = pytest.mark.containers

MIRROR = "http://deb.debian.org/debian"
DEVICE = "10.99.0.10"


def _skip_unless_possible() -> None:
    """A machine without podman skips these tests; one with podman but not what it runs (netavark,
    iptables ...) fails at once, naming it, rather than hanging in `compose up` for minutes."""
    absent = tools.missing()
    if (what := tools.verdict(absent)) == "skip":
        pytest.skip(tools.message(absent))
    if what == "fail":
        pytest.fail(tools.message(absent))
    if os.geteuid() != 0:
        pytest.skip("these podman tests run rootful (root)")
    if not Path("/dev/net/tun").exists():
        pytest.skip("/dev/net/tun is missing (wireguard-go needs it)")


@dataclass
class Stack:
    podman: Podman
    project: str
    files: list[str]
    env: dict[str, str]
    metrics_port: int

    def compose(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        cmd = [*podman_compose(), "-p", self.project, *[a for f in self.files for a in ("-f", f)], *args]
        out = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env={**self.podman.env, **self.env}
        )
        assert out.returncode == 0, f"{' '.join(args)}\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
        return out

    def container(self, service: str) -> str:
        out = self.podman.run(
            "ps",
            "-a",
            "--filter",
            f"label=com.docker.compose.project={self.project}",
            "--filter",
            f"label=com.docker.compose.service={service}",
            "--format",
            "{{.Names}}",
        )
        names = out.stdout.split()
        assert len(names) == 1, f"{service}: {names}"
        return names[0]

    def exec(self, service: str, *cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.podman.run("exec", self.container(service), *cmd, check=check, timeout=60)

    def device_state(self) -> dict[str, bool]:
        out = self.exec("site", "cat", "/tmp/device-state.json", check=False)
        return json.loads(out.stdout) if out.returncode == 0 else {}

    def enqueue(self, service: str, state: str, request_id: str) -> None:
        """As the producer login the stack makes (`webhook`, a member of agent_producer)."""
        sql = f"SELECT agent.enqueue('router-1', '{service}', '{state}', request_id => '{request_id}')"
        self.exec("postgres", "psql", "-U", "webhook", "-d", "agent", "-v", "ON_ERROR_STOP=1", "-tAc", sql)

    def sql(self, query: str) -> str:
        return self.exec("postgres", "psql", "-U", "agent", "-d", "agent", "-tAc", query).stdout.strip()


def wait_for(cond, timeout: float, what: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        result = cond()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {result!r})")
        time.sleep(0.5)  # paces the polling of a condition; never the condition itself


def _wg_keys() -> tuple[str, str]:
    private = subprocess.run(["wg", "genkey"], capture_output=True, text=True, check=True).stdout.strip()
    public = subprocess.run(["wg", "pubkey"], input=private, capture_output=True, text=True, check=True).stdout
    return private, public.strip()


def _secret_file(path: Path, text: str, uid: int = 0) -> None:
    path.write_text(text)
    os.chown(path, uid, uid)
    os.chmod(path, 0o600)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _write_configs(tmp: Path) -> dict[str, str]:
    """wg-quick files for both ends and the compose secrets; keys and passwords never leave tmp."""
    gw_private, gw_public = _wg_keys()
    site_private, site_public = _wg_keys()
    (tmp / "gateway.conf").write_text(
        f"[Interface]\nPrivateKey = {gw_private}\nAddress = 10.13.13.1/24\n\n"
        f"[Peer]\nPublicKey = {site_public}\nEndpoint = site:51820\nAllowedIPs = 10.13.13.2/32, 10.99.0.0/24\n"
        "PersistentKeepalive = 25\n"
    )
    (tmp / "site.conf").write_text(
        f"[Interface]\nPrivateKey = {site_private}\nAddress = 10.13.13.2/24\nListenPort = 51820\n\n"
        f"[Peer]\nPublicKey = {gw_public}\nAllowedIPs = 10.13.13.1/32\n"
    )
    for conf in ("gateway.conf", "site.conf"):
        os.chmod(tmp / conf, 0o600)
    secrets_dir = tmp / "secrets"
    secrets_dir.mkdir(mode=0o700)
    owner, agentd, webhook = (secrets.token_urlsafe(18) for _ in range(3))
    for name, password in (("postgres_password", owner), ("agentd_password", agentd), ("webhook_password", webhook)):
        _secret_file(secrets_dir / name, password)
        os.chmod(secrets_dir / name, 0o644)  # read by the postgres entrypoint and its init scripts
    _secret_file(secrets_dir / "owner_pgpass", f"postgres:5432:agent:agent:{owner}\n", uid=10001)
    _secret_file(secrets_dir / "pgpass", f"postgres:5432:agent:agentd:{agentd}\n", uid=10001)
    devices = secrets_dir / "devices"
    devices.mkdir()
    _secret_file(devices / "router-1-admin", secrets.token_urlsafe(18) + "\n")
    os.chmod(devices / "router-1-admin", 0o644)  # the site's device reads it as root, the agent as 10001
    os.chmod(secrets_dir, 0o755)
    return {
        "WG_CONF": str(tmp / "gateway.conf"),
        "SITE_WG_CONF": str(tmp / "site.conf"),
        "SECRETS_DIR": str(secrets_dir),
        "CREDENTIALS_DIR": str(devices),
    }


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    _skip_unless_possible()
    compose_cmd = podman_compose()
    assert compose_cmd
    podman = Podman()
    run_id = uuid.uuid4().hex[:8]
    project = f"agenttest{run_id}"
    port = _free_port()
    st = Stack(podman, project, ["compose.yml", str(Path(__file__).with_name("compose.test.yml"))], {}, port)
    try:
        podman.ensure_base_image(MIRROR)
        agent_image = f"localhost/pgmq-edge-agent:test-{run_id}"
        standin_image = f"localhost/pgmq-edge-agent-standin:test-{run_id}"
        podman.build_agent_image(agent_image)
        podman.build(standin_image, Path(__file__).with_name("standin"))
        st.env = {
            **_write_configs(podman.tmp),
            "AGENT_IMAGE": agent_image,
            "STANDIN_IMAGE": standin_image,
            "AGENT_METRICS_PUBLISH": f"127.0.0.1:{port}",
        }
        # podman 4.3 (Debian 12) has no `wait --condition=healthy` and no systemd timers for health
        # checks, so podman-compose cannot honour `service_healthy`; and it starts `--requires`
        # dependencies again, which fails for the exited one-shot migrate. So the test walks
        # compose.yml's depends_on itself, running the health checks, and starts each service with
        # --no-deps. Docker Compose (and podman >= 4.6) do this from the file alone.
        st.compose("up", "-d", "postgres", "site", "wireguard")
        podman.wait_healthy(st.container("postgres"), 120)
        podman.wait_healthy(st.container("wireguard"), 60)
        st.compose("up", "-d", "--no-deps", "migrate")
        migrate = st.container("migrate")
        wait_for(lambda: podman.inspect(migrate)["State"]["Status"] == "exited", 120, "migrate to finish")
        st.compose("up", "-d", "--no-deps", "agent")
        yield st
    finally:
        if st.env:
            subprocess.run(
                [
                    *compose_cmd,
                    "-p",
                    project,
                    *[a for f in st.files for a in ("-f", f)],
                    "down",
                    "-v",
                    "-t",
                    "10",
                    "--remove-orphans",
                ],
                capture_output=True,
                timeout=300,
                cwd=ROOT,
                env={**podman.env, **st.env},
            )
        podman.close()


def test_migrate_runs_db_init_once_before_the_agent(stack: Stack) -> None:
    migrate = stack.container("migrate")
    state = stack.podman.inspect(migrate)["State"]
    logs = stack.podman.run("logs", migrate).stdout
    assert state["ExitCode"] == 0, logs
    assert "queue device_tasks and dead-letter queue device_tasks_dlq ready" in logs


def test_command_from_psql_reaches_the_device_through_the_tunnel(stack: Stack) -> None:
    # as the database's owner, through the migrate service (the agent's own login may not change the inventory)
    stack.compose(
        "run",
        "--rm",
        "--no-deps",
        "migrate",
        "device",
        "add",
        "router-1",
        "--driver",
        "http",
        "--address",
        f"{DEVICE}:8080",
        "--credential",
        "router-1-admin",
        "--option",
        "read_path=/state/{service}",
        "--option",
        "state_pointer=/value",
        "--option",
        "probe_path=/state",
    )
    wait_for(
        lambda: stack.exec("agent", "agentctl", "status", check=False).returncode == 0,
        120,
        "agentctl status healthy in the agent container",
    )
    stack.enqueue("wifi", "on", "compose-1")
    wait_for(lambda: stack.device_state() == {"wifi": True}, 60, "the device behind the tunnel switched on")
    states = json.loads(stack.exec("agent", "agentctl", "state", "--device", "router-1", "--json").stdout)
    wait_for(
        lambda: (
            json.loads(stack.exec("agent", "agentctl", "state", "--device", "router-1", "--json").stdout)[0]["observed"]
            == "on"
        ),
        30,
        "the verified state reported",
    )
    assert states[0]["desired"] == "on"


def test_agent_health_check_status_and_published_metrics(stack: Stack) -> None:
    agent = stack.container("agent")
    stack.podman.wait_healthy(agent, 60)
    status = json.loads(stack.exec("agent", "agentctl", "status", "--json").stdout)
    assert status["healthy"] is True
    with urllib.request.urlopen(f"http://127.0.0.1:{stack.metrics_port}/metrics", timeout=10) as resp:
        metrics = resp.read().decode()
    # The agent sees the tunnel's peer alive. (The prefix is left open: issue 12 renames `agent_`.)
    assert re.search(r'^\w+_wireguard_peer_up\{peer="[^"]+"\} 1(\.0)?$', metrics, re.M), metrics


def test_recreating_wireguard_recreates_the_agent_which_recovers(stack: Stack) -> None:
    before = stack.podman.inspect(stack.container("agent"))["Id"]
    stack.compose("up", "-d", "--force-recreate", "--no-deps", "wireguard")
    stack.podman.wait_healthy(stack.container("wireguard"), 90)
    agent = stack.container("agent")
    assert stack.podman.inspect(agent)["Id"] != before, "compose did not re-create the agent"
    stack.podman.wait_healthy(agent, 120)
    stack.enqueue("wifi", "off", "compose-2")
    wait_for(lambda: stack.device_state() == {"wifi": False}, 60, "the device switched off after recovery")


def test_the_agent_logs_in_as_its_worker_role_not_as_a_superuser(stack: Stack) -> None:
    wait_for(lambda: stack.sql("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'agentd'") != "0",
             60, "the agent connected")
    logins = stack.sql("SELECT DISTINCT a.usename || ' ' || u.usesuper FROM pg_stat_activity a JOIN pg_user u "
                       "ON u.usename = a.usename WHERE a.application_name = 'agentd'")
    assert logins == "agentd false"
    assert stack.sql("SELECT pg_has_role('agentd', 'agent_worker', 'member')") == "t"
    assert stack.sql("SELECT pg_has_role('webhook', 'agent_producer', 'member')") == "t"


def test_no_secret_in_the_image_or_container_config(stack: Stack) -> None:
    password = (Path(stack.env["SECRETS_DIR"]) / "postgres_password").read_text().strip()
    token = (Path(stack.env["CREDENTIALS_DIR"]) / "router-1-admin").read_text().strip()
    for service in ("agent", "migrate", "wireguard", "postgres"):
        config = json.dumps(stack.podman.inspect(stack.container(service)))
        assert password not in config and token not in config, service
    history = stack.podman.run("history", "--no-trunc", stack.env["AGENT_IMAGE"]).stdout
    assert password not in history and token not in history
    logs = stack.podman.run("logs", stack.container("agent")).stdout
    assert password not in logs and token not in logs


def test_the_agent_is_created_and_ready_while_the_remote_site_is_down(stack: Stack) -> None:
    """The wireguard service is healthy once its interface is up, handshake or not: with the far side
    down at `up`, the agent is still created, ready, and works the queue (retrying, or parking once it
    judges the peer down) instead of never being created."""
    stack.exec("site", "ip", "link", "set", "wg0", "down")  # the far side stops answering (its name still resolves)
    before = stack.podman.inspect(stack.container("agent"))["Id"]
    stack.compose("up", "-d", "--force-recreate", "--no-deps", "wireguard")
    stack.podman.wait_healthy(stack.container("wireguard"), 90)  # no peer has ever answered this one
    agent = stack.container("agent")
    assert stack.podman.inspect(agent)["Id"] != before
    stack.podman.wait_healthy(agent, 120)
    stack.enqueue("wifi", "on", "compose-down-1")

    def tried() -> str:
        return stack.sql("SELECT string_agg(kind, ' ') FROM agent.events WHERE request_id = 'compose-down-1'")

    try:
        kinds = wait_for(lambda: any(k in tried() for k in ("retried", "parked")) and tried(), 120,
                         "the command tried (or parked) while the site is down")
    except AssertionError as exc:
        logs = stack.podman.run("logs", "--tail", "40", agent).stdout
        raise AssertionError(f"{exc}\nagent log:\n{logs}") from None
    assert "dead_lettered" not in kinds and "verified" not in kinds
