"""The files we ship for operators are checked by the tools that will read them."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ETC = Path(__file__).resolve().parents[2] / "etc"


def tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} not installed (Debian package `{package}`)")
    return path


def test_alert_rules_are_valid():
    promtool = tool("promtool", "prometheus")
    out = subprocess.run([promtool, "check", "rules", "agent-alerts.yml"], cwd=ETC / "prometheus",
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_alert_rules_fire_as_specified():
    promtool = tool("promtool", "prometheus")
    out = subprocess.run([promtool, "test", "rules", "agent-alerts.test.yml"], cwd=ETC / "prometheus",
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_systemd_unit_verifies(tmp_path):
    analyze = tool("systemd-analyze", "systemd")
    agentd = shutil.which("agentd") or str(Path(sys.executable).with_name("agentd"))
    unit = (ETC / "systemd" / "agentd.service").read_text().replace("/usr/bin/agentd", agentd)
    (tmp_path / "agentd.service").write_text(unit)
    out = subprocess.run([analyze, "verify", str(tmp_path / "agentd.service")], capture_output=True, text=True)
    assert out.returncode == 0 and "agentd.service" not in out.stdout + out.stderr, out.stdout + out.stderr
    assert "Type=notify" in unit and "WatchdogSec=" in unit and "NoNewPrivileges=yes" in unit


def test_ci_installs_every_program_the_compose_tests_run_and_checks_for_them_first():
    from tests.packaging import tools

    root = ETC.parent
    for script in (".ci/packaging", ".ci/run"):
        text = (root / script).read_text()
        assert not [p for p in tools.COMPOSE.values() if f" {p} " not in text.replace("\\\n", " ")], script
    packaging = (root / ".ci/packaging").read_text()
    assert packaging.index("tests/packaging/tools.py") < packaging.index("./scripts/test"), "checked up front"


def test_a_missing_compose_program_is_named_with_its_package():
    from tests.packaging import tools

    absent = tools.missing({"sh": "dash", "no-such-netavark": "netavark-pkg"})
    assert absent == {"no-such-netavark": "netavark-pkg"}
    assert "no-such-netavark" in tools.message(absent) and "install -y --no-install-recommends netavark-pkg" in \
        tools.message(absent)
    assert tools.verdict(absent) == "fail"  # podman there without what it runs: compose up would hang
    assert tools.verdict({"podman": "podman", **absent}) == "skip" and tools.verdict({}) is None
