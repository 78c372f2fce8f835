"""The documentation cannot drift from the code it documents."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

from agent.contract import json_schema
from agent.ops.admin import read_device_file, validate_device
from agent.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def test_published_schema_is_the_generated_one():
    assert json.loads((ROOT / "docs" / "contract.schema.json").read_text()) == json_schema()


def test_every_setting_is_documented():
    text = (ROOT / "docs" / "configuration.md").read_text()
    missing = [f"AGENT_{name.upper()}" for name in Settings.model_fields if f"`AGENT_{name.upper()}`" not in text]
    assert missing == []


def test_example_files_parse():
    keys = set(tomllib.loads((ROOT / "etc" / "agent.toml.example").read_text()))
    assert keys <= set(Settings.model_fields)
    devices = read_device_file(ROOT / "etc" / "devices.example.toml", "default")
    assert [d.id for d in devices] == ["lab-sim-1", "router-1"]
    for device in devices:
        validate_device(device)


def test_the_example_configuration_shows_every_setting():
    import re

    from agent.settings import Settings

    text = (ROOT / "etc" / "agent.toml.example").read_text()
    missing = [k for k in Settings.model_fields if not re.search(rf"^#? ?{k}\s*=", text, re.M)]
    assert missing == []


def test_every_event_kind_is_documented_in_the_contract():
    import re

    from agent.db.schema import migrations

    # what the migrations allow, in order: a list stated whole, then kinds added (allow_event_kinds, 0012's ARRAY)
    kinds: set[str] = set()
    for _v, _n, sql in migrations():
        for restated in re.findall(r"events_kind_check CHECK \(kind IN \(([^)]*)\)\)", sql):
            if listed := set(re.findall(r"'(\w+)'", restated)):
                kinds = listed
        for added in re.findall(r"SELECT agent\.allow_event_kinds\(([^)]*)\)|ARRAY\[([^]]*)\]\)\) AS u;", sql):
            kinds |= set(re.findall(r"'(\w+)'", "".join(added)))
    text = (ROOT / "docs" / "contract.md").read_text()
    table = text[text.index("`kind` is one of:"):]
    assert kinds and [k for k in kinds if f"`{k}`" not in table] == []


def test_the_settings_marked_live_are_the_ones_a_reload_swaps_in():
    import re

    from agent.settings import LIVE

    rows = [line for line in (ROOT / "docs" / "configuration.md").read_text().splitlines()
            if line.startswith("| `AGENT_")]
    marked = {re.match(r"\| `AGENT_(\w+)`", row).group(1).lower() for row in rows if "*live*" in row}  # type: ignore[union-attr]
    assert marked == LIVE


def test_every_pip_install_the_install_docs_show_runs_in_a_virtual_environment():
    """Debian 12's system Python refuses `pip install` outside a venv (externally-managed-environment):
    each shell block of the install docs that installs with pip makes and activates a venv before."""
    for doc in ("README.md", "docs/operations.md", "docs/deployment.md"):
        text = (ROOT / doc).read_text()
        for block in re.findall(r"```sh\n(.*?)```", text, re.S):
            if not re.search(r"(^|&& )pip3? install", block, re.M):
                continue
            before = block[: re.search(r"(^|&& )pip3? install", block, re.M).start()]
            assert re.search(r"python3 -m venv (\S+) && \. \1/bin/activate", before), f"{doc}: {block[:80]!r}"


def test_the_runbook_says_exit_2_is_not_restarted_and_a_missing_tunnel_is_waited_for():
    """Exit 2 is for what a restart cannot heal, and the packaged unit does not restart it
    (RestartPreventExitStatus=2): no row of the runbook promises a restart after one. A missing
    WireGuard interface is no exit at all: the agent waits for it, not ready."""
    rows = [ln for ln in (ROOT / "docs" / "operations.md").read_text().splitlines() if ln.startswith("| ")]
    exits_2 = [r for r in rows if re.search(r"exits? 2", r.split(" | ")[0])]
    assert len(exits_2) > 5
    assert not [r for r in exits_2 if re.search(r"supervisor restarts|is restarted|restarts agentd", r)]
    vpn = [r for r in rows if "not in the VPN's network namespace" in r]
    assert vpn and not [r for r in vpn if "exit" in r.split(" | ")[0]]
    assert "starts by itself once the interface is there" in vpn[0]
