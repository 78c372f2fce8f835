"""The Debian package, built from the checkout and installed on this machine for real.

Needs root (dpkg -i) and Debian's packaging tools; skipped otherwise with the command that installs
them. Removes the package (purge) and everything the tests wrote when done.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.packaging.proxy import TcpToUnix
from tests.packaging.unit import environment, exec_start, service_section
from tests.support.notify import NotifySocket
from tests.support.wait import until

pytestmark = pytest.mark.packaging

ROOT = Path(__file__).resolve().parents[2]
PKG = "pgmq-edge-agent"
UNIT = Path(f"/lib/systemd/system/{PKG}.service")
ETC = Path("/etc/pgmq-edge-agent")
INSTALL = (
    "apt-get install -y --no-install-recommends debhelper dh-virtualenv dpkg-dev fakeroot lintian "
    "python3.11-venv python3-pip systemd"
)


def _skip_unless_possible() -> None:
    missing = [
        t
        for t in ("dpkg-buildpackage", "dh_virtualenv", "fakeroot", "lintian", "systemd-analyze")
        if shutil.which(t) is None
    ]
    if missing or not Path("/usr/bin/python3.11").exists():
        pytest.skip(f"{', '.join(missing) or 'python3.11'} missing; install: {INSTALL}")
    if os.geteuid() != 0:
        pytest.skip("installing a package needs root (dpkg -i)")
    status = subprocess.run(["dpkg-query", "-W", "-f=${Status}", PKG], capture_output=True, text=True)
    if "installed" in status.stdout:
        pytest.skip(f"{PKG} is already installed on this machine; the tests would remove it")


def run(*cmd: str | Path, timeout: float = 120, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    out = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kwargs)
    assert out.returncode == 0, f"{' '.join(map(str, cmd))} -> {out.returncode}\n{out.stdout}\n{out.stderr}"
    return out


@pytest.fixture(scope="module")
def deb() -> Path:
    _skip_unless_possible()
    out = run(ROOT / "scripts" / "build-deb", timeout=600, cwd=ROOT)
    return ROOT / out.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def installed(deb: Path) -> Iterator[list[str]]:
    """The package installed with dpkg -i; yields the paths it owns. Purged at the end whatever happened."""
    run("dpkg", "-i", deb)
    try:
        yield run("dpkg", "-L", PKG).stdout.splitlines()
    finally:
        subprocess.run(["dpkg", "--purge", PKG], capture_output=True, timeout=120)


def test_lintian_passes_at_error_and_warning_level(deb: Path) -> None:
    out = subprocess.run(
        ["lintian", "--fail-on", "error,warning", deb.with_suffix(".changes")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_installs_service_user_and_private_directories(installed: list[str]) -> None:
    user = pwd.getpwnam(PKG)
    assert user.pw_shell == "/usr/sbin/nologin"
    etc, creds = ETC.stat(), (ETC / "credentials").stat()
    assert (stat.S_IMODE(etc.st_mode), etc.st_gid) == (0o750, grp.getgrnam(PKG).gr_gid)
    assert (stat.S_IMODE(creds.st_mode), creds.st_uid) == (0o700, 0)
    assert not (ETC / "agent.toml").exists(), "the example must not be a live config (the unit would start)"
    conffiles = Path(f"/var/lib/dpkg/info/{PKG}.conffiles").read_text().split()
    assert conffiles == ["/etc/pgmq-edge-agent/agent.env"]


def test_unit_and_netns_drop_in_pass_systemd_analyze_verify(installed: list[str]) -> None:
    unit = UNIT.read_text()
    assert "ConditionPathExists=/etc/pgmq-edge-agent/agent.toml" in unit and "Type=notify" in unit
    assert Path("/etc/systemd/system/multi-user.target.wants", UNIT.name).is_symlink(), "enabled on install"
    run("systemd-analyze", "verify", UNIT)
    dropin_dir = Path(f"/etc/systemd/system/{UNIT.name}.d")
    dropin_dir.mkdir(exist_ok=True)
    try:
        shutil.copy(f"/usr/share/doc/{PKG}/examples/netns.conf", dropin_dir / "netns.conf")
        out = run("systemd-analyze", "verify", UNIT)
        assert "netns" not in out.stderr, out.stderr
    finally:
        shutil.rmtree(dropin_dir)


def test_installed_commands_man_pages_and_completion(installed: list[str]) -> None:
    assert run("agentd", "--version").stdout.strip().startswith("agentd ")
    assert run("agentctl", "--version").stdout.strip().startswith("agentctl ")
    assert "--once" in run("agentd", "--help").stdout
    assert "enqueue" in run("agentctl", "--help").stdout
    for page in ("/usr/share/man/man8/agentd.8.gz", "/usr/share/man/man8/agentctl.8.gz"):
        assert page in installed
    comp = run(
        "bash",
        "-c",
        "source /usr/share/bash-completion/completions/agentctl; COMP_WORDS=(agentctl dl);"
        " COMP_CWORD=1; _agentctl; echo ${COMPREPLY[@]}",
    )
    assert comp.stdout.split() == ["dlq"]


async def test_installed_agentd_started_as_the_unit_does_reaches_ready_and_applies_a_command(
    installed: list[str], empty_dsn: str
) -> None:
    service = service_section(UNIT)
    user = service["User"][0]
    scratch = Path(tempfile.mkdtemp(prefix="agent-deb-"))
    os.chmod(scratch, 0o755)
    device_dir = scratch / "device"
    device_dir.mkdir()
    shutil.chown(device_dir, user, user)
    port = _free_port()
    proxy = TcpToUnix(empty_dsn)
    config = ETC / "agent.toml"
    config.write_text(
        f'database_url = "{proxy.dsn}"\nhttp_listen = "127.0.0.1:{port}"\n'
        'require_vpn = false\nreconcile_schedule = "off"\npoll_interval = 60\n'
    )
    os.chmod(config, 0o640)
    shutil.chown(config, "root", PKG)
    notify = NotifySocket(scratch)
    os.chmod(notify.path, 0o666)
    proc = None
    try:
        ctl = ["agentctl", "--config", str(config)]
        run(*ctl, "db", "init")
        run(*ctl, "device", "add", "r1", "--driver", "sim", "--option", f"state_file={device_dir}/r1.json")
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "NOTIFY_SOCKET": notify.path, **environment(service)}
        proc = subprocess.Popen(
            exec_start(service),
            env=env,
            user=user,
            group=service["Group"][0],
            extra_groups=[],
            cwd="/",
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            await until(
                lambda: notify.with_key("READY", "1") or proc.poll() is not None,
                timeout=60,
                what="READY=1 on the notify socket",
            )
        except AssertionError:
            proc.kill()
            raise AssertionError(f"no READY=1; agentd said:\n{proc.communicate()[0]}") from None
        assert proc.poll() is None, proc.communicate()[0]
        run(*ctl, "enqueue", "r1", "wifi", "on", "--request-id", "deb-1")
        state_file = device_dir / "r1.json"
        await until(
            lambda: state_file.exists() and json.loads(state_file.read_text()) == {"wifi": "on"},
            timeout=30,
            what="the sim device switched on",
        )
        await until(
            lambda: json.loads(run(*ctl, "state", "--device", "r1", "--json").stdout)[0]["observed"] == "on",
            timeout=15,
            what="the state verified and reported",
        )
        assert run(*ctl, "status").returncode == 0
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out
        assert notify.with_key("STOPPING", "1")
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
        notify.close()
        proxy.close()
        config.unlink(missing_ok=True)
        shutil.rmtree(scratch, ignore_errors=True)


def test_the_installed_agent_logs_to_the_journal_with_priorities_and_fields(installed: list[str]) -> None:
    """systemd-python is built into the package: under systemd a warning reaches journald at
    priority 4 with the record's fields (journalctl -p warning, ACTION=...), not as a plain line."""
    python = f"/usr/lib/{PKG}/bin/python"
    script = ("import logging; from agent import log; log.setup(); "
              "logging.getLogger('agent.executor').warning('r1 unreachable: %s', 'peer_down', "
              "extra={'action': 'unreachable', 'device': 'r1'})")
    out = run("unshare", "--mount", "--propagation", "private", "/usr/bin/python3",
              Path(__file__).with_name("journal.py"), "--", python, "-c", script)
    caught = json.loads(out.stdout)
    assert caught["returncode"] == 0, caught
    warning = next(e for e in caught["entries"] if e.get("MESSAGE") == "r1 unreachable: peer_down")
    assert warning["PRIORITY"] == "4" and warning["ACTION"] == "unreachable" and warning["DEVICE"] == "r1"
    assert warning["SYSLOG_IDENTIFIER"] == "agentd"
    assert caught["stdout"] == "", "nothing goes to stdout when the journal takes the records"


def test_the_alert_rules_their_tests_and_the_dashboard_are_shipped_as_examples(installed: list[str]) -> None:
    examples = Path(f"/usr/share/doc/{PKG}/examples")
    for name in ("agent-alerts.yml", "agent-alerts.test.yml", "pgmq-edge-agent.json"):
        shipped = examples / name if (examples / name).exists() else examples / f"{name}.gz"
        assert shipped.exists(), f"{name} is not under {examples}"


def test_purge_removes_every_file_it_installed(installed: list[str]) -> None:
    # Run as root with byte-code writing on: removal must clean up what Python writes beside the modules.
    run("agentctl", "--help", env={"PATH": "/usr/bin:/bin"})
    run("dpkg", "--purge", PKG)
    # Directories such as /usr/share/man stay: other packages own them too. Every file and link goes,
    # and so do the directories that are ours alone.
    left = [p for p in installed if os.path.lexists(p) and not os.path.isdir(p)]
    assert left == []
    for own in (ETC, Path("/usr/lib", PKG), Path("/usr/share/doc", PKG)):
        assert not own.exists(), own
    assert not Path("/etc/systemd/system/multi-user.target.wants", UNIT.name).exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
