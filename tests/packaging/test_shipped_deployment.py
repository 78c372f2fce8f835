"""Fast checks of the deployment files (no build, no containers): they name what the code provides."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

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


def test_compose_is_an_operators_stack_and_prometheus_keeps_the_agents_labels() -> None:
    """The agent logs in as its worker login, the URLs and the secrets' places are overridable with
    defaults that start (no device secret the stack insists on), the agent starts once the tunnel's
    interface is up (not once the far side answered), and the scrape keeps the agent's `site` label
    (not `exported_site` beside the target's). The container tests run the stack itself."""
    text = (ROOT / "compose.yml").read_text()
    assert "AGENT_DATABASE_URL: ${AGENT_DATABASE_URL:-postgresql://agentd@postgres:5432/agent}" in text
    assert "AGENT_DATABASE_URL: ${AGENT_OWNER_DATABASE_URL:-" in text  # migrate, as the owner
    files = re.findall(r"^\s+file: (\S+)$", text, re.M)
    assert files and all(f.startswith("${SECRETS_DIR:-./secrets}/") for f in files), files
    assert "router-1-admin" not in text.split("\nsecrets:", 1)[1]
    assert "${CREDENTIALS_DIR:-./secrets/devices}:/run/credentials:ro" in text
    health = re.search(r"wireguard:.*?healthcheck:\s+.*?test: (.*?)\n", text, re.S)
    assert health and "ip link show wg0" in health.group(1) and "handshake" not in health.group(1)
    scrape = (ROOT / "packaging" / "docker" / "prometheus.yml").read_text()
    assert re.search(r"^\s+honor_labels: true$", scrape, re.M)


def test_containerfile_is_the_dockerfile() -> None:
    link = ROOT / "packaging" / "docker" / "Containerfile"
    assert link.is_symlink() and link.resolve() == (ROOT / "packaging" / "docker" / "Dockerfile")


def gen_man() -> Any:
    """scripts/gen-man as a module."""
    import importlib.machinery
    import importlib.util

    loader = importlib.machinery.SourceFileLoader("gen_man", str(ROOT / "scripts" / "gen-man"))
    spec = importlib.util.spec_from_loader("gen_man", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


@pytest.mark.parametrize("prog", ["agentd", "agentctl"])
def test_man_pages_generate_from_the_parsers(tmp_path: Path, prog: str) -> None:
    assert gen_man().main(["--man-dir", str(tmp_path), "--completion-dir", str(tmp_path), "--date", "2026-01-01"]) == 0
    page = (tmp_path / f"{prog}.8").read_text()
    assert page.startswith(f".TH {prog.upper()} 8") and "\\-\\-config" in page
    for section in (".SH EXIT STATUS", ".SH ENVIRONMENT", ".SH FILES"):
        assert section in page
    assert ".B 2\n" in page
    assert f"complete -F _{prog} {prog}" in (tmp_path / prog).read_text()


def test_every_exit_status_is_in_the_man_pages_and_the_runbook_alike() -> None:
    """agentctl's codes are agent/cli/exits.py's; the runbook's tables (agentd's says what the packaged
    unit does with each) list the codes the man pages do, and each "not found" command is named in both."""
    from agent.cli import exits

    statuses = gen_man().EXIT_STATUS
    runbook = (ROOT / "docs" / "operations.md").read_text()

    def table(header: str) -> dict[str, str]:
        rows = runbook[runbook.index(header):].split("\n\n", 1)[0]
        return dict(re.findall(r"^\s*\| (\d+) \| (.*) \|$", rows, re.M))

    agentd, agentctl = table("| status | meaning | the unit |"), table("| status | meaning |\n")
    assert list(agentd) == [code for code, _ in statuses["agentd"]]
    assert all(row.rsplit("|", 1)[1].strip() for row in agentd.values()), "say what the unit does with each"
    assert sorted(map(int, agentctl)) == [int(code) for code, _ in statuses["agentctl"]] == \
        sorted({exits.OK, exits.FAILED, exits.BAD_REQUEST, exits.TIMED_OUT, exits.NOT_FOUND})
    man_not_found = dict(statuses["agentctl"])[str(exits.NOT_FOUND)]
    for command in ("enqueue", "device remove", "sync --device", "dlq replay", "sync --show", "agent forget",
                    "service forget", "batch show", "guard --site"):
        head, _, rest = command.partition(" ")
        assert command in man_not_found or (head in man_not_found and rest.split()[0] in man_not_found), command
        assert f"`{head}" in agentctl[str(exits.NOT_FOUND)], command
