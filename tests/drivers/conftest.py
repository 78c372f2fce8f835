"""Fixtures of the driver contract suite: one test server per driver and module, a fresh driver per test.

The suite runs for every driver installed in the entry-point group `agent.drivers`, and for any
driver named in $AGENT_CONTRACT_TARGETS. Each driver's target module (see target.py) is
  - the one named for it in AGENT_CONTRACT_TARGETS="name=spec [name=spec ...]" (comma or space
    separated), where spec is a dotted module name or the path of a .py file; otherwise
  - tests.drivers.target_<name>, when that module exists.
A driver without a target module is skipped with a reason that names the module to write.
A driver reached in more than one way has a target module per way: tests.drivers.target_<name>_<way>
(e.g. target_routeros_api, the routeros driver over the binary API) runs the suite once more, as
"<name>_<way>", with a Target for driver <name>.
Every check runs twice per driver: "direct" on loopback, and "wan" through a WAN-like link in front
of the target's device (tests/drivers/link.py).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType

import pytest

from agent.drivers.base import Driver
from agent.drivers.registry import available, load_driver
from tests.drivers.link import LINKS, through_wan
from tests.drivers.target import Target

ENV = "AGENT_CONTRACT_TARGETS"


def configured_targets(text: str) -> dict[str, str]:
    """Parse AGENT_CONTRACT_TARGETS: driver name -> module name or file path."""
    targets = {}
    for item in re.split(r"[\s,]+", text.strip()):
        if not item:
            continue
        name, sep, spec = item.partition("=")
        if not sep or not name or not spec:
            raise pytest.UsageError(f"{ENV}: {item!r} is not DRIVER=MODULE_OR_FILE")
        targets[name] = spec
    return targets


def driver_names() -> list[str]:
    """The targets to run: every driver, and every other way to one (target_<driver>_<way>.py)."""
    drivers = set(available()) | set(configured_targets(os.environ.get(ENV, "")))
    ways = {p.stem.removeprefix("target_") for p in Path(__file__).parent.glob("target_*_*.py")}
    return sorted(drivers | {w for w in ways if driver_of(w, drivers) != w})


def driver_of(name: str, drivers: set[str] | None = None) -> str:
    """The driver a target name is for: itself, or the driver whose name it extends with `_<way>`."""
    known = drivers if drivers is not None else set(available())
    return name if name in known else next((d for d in sorted(known, key=len, reverse=True)
                                            if name.startswith(d + "_")), name)


def load_target_module(name: str) -> ModuleType | str:
    """The driver's target module, or why there is none (a skip reason)."""
    spec = configured_targets(os.environ.get(ENV, "")).get(name)
    if spec is not None and (spec.endswith(".py") or os.sep in spec):
        path = Path(spec).resolve()
        found = importlib.util.spec_from_file_location(f"contract_target_{name}", path)
        if found is None or found.loader is None or not path.is_file():
            raise pytest.UsageError(f"{ENV}: no target module at {path} for driver {name!r}")
        module = importlib.util.module_from_spec(found)
        found.loader.exec_module(module)
        return module
    module_name = spec or f"tests.drivers.target_{name}"
    if spec is None and (not name.isidentifier() or importlib.util.find_spec(module_name) is None):
        return (f"no contract target for driver {name!r}: write tests/drivers/target_{name}.py "
                f"(see tests/drivers/target.py), or point {ENV}={name}=path/to/target.py at yours")
    return importlib.import_module(module_name)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "driver_name" in metafunc.fixturenames:
        names = driver_names()
        metafunc.parametrize("driver_name", names, ids=names, scope="module")
    if "link" in metafunc.fixturenames:
        metafunc.parametrize("link", LINKS, ids=LINKS, scope="module")


@pytest.fixture(scope="module")
async def target(driver_name: str, link: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Target]:
    driver = driver_of(driver_name)
    if driver not in available():
        pytest.fail(f"driver {driver_name!r} is named in {ENV} but not installed in the entry-point "
                    f"group agent.drivers (pip install your plugin into this environment)")
    module = load_target_module(driver_name)
    if isinstance(module, str):
        pytest.skip(module)
    async with module.target(tmp_path_factory.mktemp(f"contract-{driver_name}")) as t:
        assert isinstance(t, Target), f"{module.__name__}.target() must yield a tests.drivers.target.Target"
        assert t.driver == driver, f"{module.__name__} yields a target for {t.driver!r}, not {driver!r}"
        if link == "direct":
            yield t
        else:
            async with through_wan(t) as far:
                yield far


@pytest.fixture
async def driver(target: Target) -> AsyncIterator[Driver]:
    d = load_driver(target.driver, target.context)
    try:
        yield d
    finally:
        await d.close()
