"""The layering holds: import-linter's contracts (pyproject.toml) are kept by the code as it is, and
they would catch a forbidden import if one were added."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LINT = Path(sys.executable).with_name("lint-imports")

pytestmark = pytest.mark.skipif(not LINT.exists(), reason="import-linter is not installed (pip install -e '.[test]')")


def lint(where: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(LINT), "--config", str(where / "pyproject.toml"), "--no-cache"], cwd=where,
                          capture_output=True, text=True, timeout=120, env={"PYTHONPATH": str(where), "PATH": ""})


def test_every_layering_contract_is_kept():
    done = lint(ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout


@pytest.mark.parametrize(("module", "forbidden", "contract"), [
    ("agent/executor/deadlines.py", "agent.queue.reports", "the executor imports neither the queue"),
    ("agent/drivers/body.py", "agent.settings", "drivers import only the vocabulary"),
    ("agent/model/sites.py", "agent.text", "the vocabulary (agent.model) imports nothing else of ours"),
    ("agent/queue/routing.py", "agent.runtime.metrics", "only the entry points and operator tools"),
    ("agent/queue/consumer.py", "agent.reconcile.request", "the queue imports no reconciliation"),
])
def test_a_forbidden_import_breaks_its_contract(tmp_path, module, forbidden, contract):
    shutil.copytree(ROOT / "agent", tmp_path / "agent", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    with (tmp_path / module).open("a") as f:
        f.write(f"\nimport {forbidden}  # noqa\n")
    done = lint(tmp_path)
    assert done.returncode != 0
    broken = [line for line in done.stdout.splitlines() if line.endswith("BROKEN")]
    assert [line for line in broken if line.startswith(contract)], done.stdout
