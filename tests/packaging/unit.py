"""Read a systemd unit the way the service manager would start it, for machines without systemd."""

from __future__ import annotations

import shlex
from pathlib import Path


def service_section(path: Path) -> dict[str, list[str]]:
    """Every key of [Service] with all its values in order (continuation lines joined)."""
    values: dict[str, list[str]] = {}
    section = ""
    for raw in path.read_text().replace("\\\n", " ").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
            continue
        if section == "[Service]" and "=" in line:
            key, value = line.split("=", 1)
            values.setdefault(key.strip(), []).append(value.strip())
    return values


def exec_start(service: dict[str, list[str]]) -> list[str]:
    [line] = service["ExecStart"]
    return shlex.split(line.lstrip("-@:+!"))


def environment(service: dict[str, list[str]]) -> dict[str, str]:
    """Environment= assignments and EnvironmentFile= files ("-" prefix: optional), later ones win."""
    env: dict[str, str] = {}
    for line in service.get("Environment", []):
        for pair in shlex.split(line):
            key, _, value = pair.partition("=")
            env[key] = value
    for name in service.get("EnvironmentFile", []):
        path = Path(name.lstrip("-"))
        if not path.exists() and name.startswith("-"):
            continue
        for raw in path.read_text().splitlines():
            line = raw.strip()
            if line and not line.startswith(("#", ";")) and "=" in line:
                key, value = line.split("=", 1)
                env[key.strip()] = value.strip().strip('"')
    return env
