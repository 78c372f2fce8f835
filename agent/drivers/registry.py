"""Find drivers through the `agent.drivers` entry-point group (the built-ins register the same way)."""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import entry_points

from agent.drivers.base import Driver, DriverContext
from agent.errors import ConfigError

GROUP = "agent.drivers"


def available() -> dict[str, str]:
    """Driver name -> "module:Class", without importing any of them."""
    return {ep.name: ep.value for ep in entry_points(group=GROUP)}


def load_driver(name: str, context: DriverContext) -> Driver:
    matches = [ep for ep in entry_points(group=GROUP) if ep.name == name]
    if not matches:
        known = ", ".join(sorted(available())) or "none installed"
        raise ConfigError(f"unknown driver {name!r} (known: {known})")
    try:
        cls = matches[0].load()
    except Exception as exc:  # an installed plugin that cannot import is a set-up error
        raise ConfigError(f"driver {name!r} failed to load: {exc}") from exc
    return cls(context)


class Drivers:
    """The driver instances of one daemon, made on first use and closed together."""

    def __init__(self, context: DriverContext, preset: dict[str, Driver] | None = None) -> None:
        self._context = context
        self._drivers: dict[str, Driver] = dict(preset or {})
        self._wrapped: dict[str, Driver] = {}
        self._wrap: Callable[[Driver], Driver] | None = None

    def wrap(self, around: Callable[[Driver], Driver]) -> None:
        """Every driver handed out from now on is `around(driver)` (the daemon's device budget)."""
        self._wrap = around
        self._wrapped.clear()

    def get(self, name: str) -> Driver:
        if (wrapped := self._wrapped.get(name)) is not None:
            return wrapped
        driver = self._drivers.get(name)
        if driver is None:
            driver = self._drivers[name] = load_driver(name, self._context)
        if self._wrap is None:
            return driver
        wrapped = self._wrapped[name] = self._wrap(driver)
        return wrapped

    async def close(self) -> None:
        for driver in self._drivers.values():
            await driver.close()
        self._drivers.clear()
        self._wrapped.clear()
