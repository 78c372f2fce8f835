"""Fast checks of the deployment files (no build, no containers): they name what the code provides."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SUFFIXES = ("_bucket", "_count", "_sum", "_total")


def exported_metric_names() -> set[str]:
    """Names in agent/runtime/metrics.py, written whole or as PREFIX + "name" (P is PREFIX)."""
    source = (ROOT / "agent" / "runtime" / "metrics.py").read_text()
    prefix = re.search(r'^PREFIX = "([a-z_]+)"', source, re.M)
    names = set(re.findall(r'"((?:[a-z]+_)+[a-z]+)"', source))
    if prefix:
        names |= {prefix.group(1) + n for n in re.findall(r'\bP(?:REFIX)? \+ "([a-z_]+)"', source)}
    return names


def test_grafana_dashboard_uses_only_exported_metrics() -> None:
    dashboard = json.loads((ROOT / "etc" / "grafana" / "pgmq-edge-agent.json").read_text())
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    exported = exported_metric_names()
    used = {m for m in re.findall(r"\b([a-z]+(?:_[a-z]+)+)\{", exprs)}
    unknown = {
        m for m in used if m not in exported and not any(m.endswith(s) and m[: -len(s)] in exported for s in SUFFIXES)
    }
    assert not unknown, f"dashboard queries metrics agent/runtime/metrics.py does not export: {sorted(unknown)}"


def test_grafana_dashboard_has_a_site_variable_that_narrows_the_agents() -> None:
    dashboard = json.loads((ROOT / "etc" / "grafana" / "pgmq-edge-agent.json").read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["site"]["definition"] == "label_values(pgmq_edge_agent_build_info, site)"
    assert 'site=~"$site"' in variables["instance"]["definition"]
    assert "pgmq_edge_agent_build" in exported_metric_names()  # exported as pgmq_edge_agent_build_info


# Directives both units must set alike (the Debian unit adds its user, paths and condition).
SHARED = ("Type", "NotifyAccess", "ExecReload", "Restart", "RestartSec", "RestartPreventExitStatus",
          "TimeoutStartSec", "WatchdogSec", "TimeoutStopSec", "KillMode", "NoNewPrivileges", "ProtectSystem",
          "ProtectHome", "PrivateTmp", "PrivateDevices", "RestrictAddressFamilies", "RestrictNamespaces",
          "SystemCallFilter", "CapabilityBoundingSet", "AmbientCapabilities", "UMask")


def unit_settings(path: Path) -> dict[str, str]:
    """The [Service] directives of a unit file (comments and other sections left out)."""
    section, out = "", {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line
        elif section == "[Service]" and line and not line.startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            out[key] = value
    return out


def test_the_generic_and_the_debian_systemd_units_agree_on_what_matters() -> None:
    generic = unit_settings(ROOT / "etc" / "systemd" / "agentd.service")
    debian = unit_settings(ROOT / "packaging" / "deb" / "debian" / "pgmq-edge-agent.service")
    differ = {k: (generic.get(k), debian.get(k)) for k in SHARED if generic.get(k) != debian.get(k)}
    assert not differ, f"the two units differ (generic, debian): {differ}"
    assert generic["RestartPreventExitStatus"] == "2" and "LoadCredential" not in generic


def test_compose_file_names_shipped_files_and_pins_images() -> None:
    """Text checks (PyYAML is not a test dependency; the container tests run the file for real)."""
    text = (ROOT / "compose.yml").read_text()
    assert 'network_mode: "service:wireguard"' in text
    images = re.findall(r"^\s+image: (\S+)$", text, re.M)
    assert images and all(re.search(r":[\w.-]+}?$", i) and not i.endswith(":latest") for i in images), images
    for host in re.findall(r"^\s+- (\./[^:]+):", text, re.M):
        assert (ROOT / host).exists(), host


def test_containerfile_is_the_dockerfile() -> None:
    link = ROOT / "packaging" / "docker" / "Containerfile"
    assert link.is_symlink() and link.resolve() == (ROOT / "packaging" / "docker" / "Dockerfile")


@pytest.mark.parametrize("prog", ["agentd", "agentctl"])
def test_man_pages_generate_from_the_parsers(tmp_path: Path, prog: str) -> None:
    import importlib.machinery
    import importlib.util

    loader = importlib.machinery.SourceFileLoader("gen_man", str(ROOT / "scripts" / "gen-man"))
    spec = importlib.util.spec_from_loader("gen_man", loader)
    assert spec is not None
    gen_man = importlib.util.module_from_spec(spec)
    loader.exec_module(gen_man)
    assert gen_man.main(["--man-dir", str(tmp_path), "--completion-dir", str(tmp_path), "--date", "2026-01-01"]) == 0
    page = (tmp_path / f"{prog}.8").read_text()
    assert page.startswith(f".TH {prog.upper()} 8") and "\\-\\-config" in page
    for section in (".SH EXIT STATUS", ".SH ENVIRONMENT", ".SH FILES"):
        assert section in page
    assert ".B 2\n" in page
    assert f"complete -F _{prog} {prog}" in (tmp_path / prog).read_text()
