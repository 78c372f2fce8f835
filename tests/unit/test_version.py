"""The version has one source, agent/__init__.py: the package, the image, compose and --version follow it."""

import re
import subprocess
from importlib.metadata import version as installed_version
from pathlib import Path

from agent import __version__

ROOT = Path(__file__).resolve().parents[2]


def deb_upstream() -> str:
    """What scripts/version (used by the package build) makes of the version for Debian."""
    return subprocess.run([str(ROOT / "scripts/version"), "--deb"], capture_output=True, text=True,
                          check=True).stdout.strip()


def test_the_installed_distribution_carries_the_source_version() -> None:
    assert installed_version("pgmq-edge-agent") == __version__


def test_the_version_is_not_the_released_0_1_0() -> None:
    assert __version__ != "0.1.0"


def test_the_debian_changelog_is_at_the_version_with_a_tilde_pre_release() -> None:
    top = (ROOT / "packaging/deb/debian/changelog").read_text().splitlines()[0]
    deb = re.match(r"pgmq-edge-agent \((.+)-\d+\)", top)
    assert deb is not None
    assert deb.group(1) == deb_upstream()


def test_the_image_and_compose_default_to_the_version() -> None:
    assert f"ARG VERSION={__version__}\n" in (ROOT / "packaging/docker/Dockerfile").read_text()
    tags = re.findall(r"\$\{AGENT_IMAGE:-pgmq-edge-agent:([^}]+)\}", (ROOT / "compose.yml").read_text())
    assert tags and set(tags) == {__version__}


def test_dpkg_sorts_the_pre_release_between_0_1_0_and_the_release() -> None:
    deb = deb_upstream() + "-1"
    release = re.sub(r"~.*", "", deb_upstream()) + "-1"
    for lower, higher in (("0.1.0-1", deb), (deb, release)):
        assert subprocess.run(["dpkg", "--compare-versions", lower, "lt", higher]).returncode == 0
