"""Settings: AGENT_* environment variables over an optional TOML file (`--config`).

Every field here is documented in docs/configuration.md; `load_settings` turns a
validation failure into a ConfigError that names the environment variable.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from agent.errors import ConfigError
from agent.reconcile.schedule import Schedule, parse_schedule

_SECRET_FIELDS = {"database_url", "session_database_url"}  # may carry a password: never echo it
QUEUE_PATTERN = r"^[a-z_][a-z0-9_]{0,39}$"


def default_agent_id(site: str, host: str | None = None) -> str:
    """The agent id when none is set (pure with `host`): the host's name and the site, the same across
    restarts, so the fleet view keeps one row per agent, and different for the agents of two sites on
    one gateway. Two agents of one site on one host need their own AGENT_AGENT_ID."""
    return f"{host or socket.gethostname()}-{site}"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="AGENT_", extra="forbid", validate_default=True)
    toml_path: ClassVar[Path | None] = None

    database_url: str = Field(min_length=1, description="Postgres DSN (libpq URL).")
    session_database_url: str | None = Field(
        None, description="DSN of the one session connection (LISTEN, leadership): set it to bypass a PgBouncer "
        "in transaction mode that AGENT_DATABASE_URL goes through. Default: AGENT_DATABASE_URL.")
    pool_size: int = Field(6, ge=1, le=100, description="Pooled connections at most (every statement but LISTEN "
                           "and leadership goes through the pool).")
    pool_idle_timeout: float = Field(60.0, gt=0, le=86400, description="Seconds an idle pooled connection is kept "
                                     "(the pool shrinks to one connection when idle).")
    statement_cache_size: int = Field(100, ge=0, le=10000, description="asyncpg's prepared statement cache per "
                                      "pooled connection; 0 behind PgBouncer in transaction mode.")
    queue: str = Field("device_tasks", pattern=QUEUE_PATTERN, description="PGMQ queue to consume.")
    site: str = Field("default", min_length=1, max_length=64, description="Site this agent serves.")
    agent_id: str = Field(
        "", max_length=200, description="Name of this agent in events and heartbeats (default, or empty: "
        "<hostname>-<site>, the same across restarts).")
    http_listen: str = Field("127.0.0.1:9477", description="host:port of the HTTP endpoint; empty disables.")
    poll_interval: float = Field(30.0, gt=0, le=3600, description="Fallback poll, seconds.")
    concurrency: int = Field(32, ge=1, le=4096, description="Devices operated at once.")
    coalesce: int = Field(100, ge=1, le=10000, description="Commands for one device taken together at most.")
    batch_size: int = Field(100, ge=1, le=1000, description="Messages per pgmq.read.")
    prefetch: int = Field(1000, ge=1, le=100000, description="Messages held in flight at most.")
    visibility_timeout: int = Field(30, ge=2, le=86400, description="Lease on a read message, seconds.")
    max_attempts: int = Field(10, ge=1, le=1000, description="Deliveries before dead-lettering.")
    retry_base: float = Field(1.0, gt=0, description="First retry delay, seconds.")
    retry_max: float = Field(300.0, gt=0, description="Longest retry delay, seconds.")
    notify_throttle_ms: int = Field(250, ge=0, le=60000, description="PGMQ insert-notify throttle.")
    listener_check_interval: float = Field(30.0, gt=0, description="Liveness check of the session connection, s.")
    device_timeout: float = Field(10.0, gt=0, description="Default timeout of one device call, seconds.")
    max_message_bytes: int = Field(65536, ge=256, description="Larger messages are dead-lettered.")
    credentials_dir: Path | None = Field(None, description="Where named device credentials live.")
    log_format: Literal["plain", "json"] = Field("plain", description="Log line format on stdout.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO")
    drain_timeout: float = Field(20.0, ge=0, description="Shutdown: how long in-flight work may finish.")
    heartbeat_interval: float = Field(60.0, ge=1, le=3600, description="Heartbeat row in agent.agents, seconds.")
    watchdog_stall: float = Field(60.0, ge=5, description="Work waiting with no progress this long stops WATCHDOG=1.")
    consume: bool = Field(True, description="Consume the queue (false: status, metrics and heartbeat only).")
    require_vpn: bool = Field(True, description="Devices with an address must be reached through WireGuard.")
    wg_interface: str | None = Field(None, description="The WireGuard interface (default: the only one).")
    vpn_check_interval: float = Field(2.0, gt=0, le=300, description="Seconds between tunnel samples.")
    vpn_stale_after: float = Field(180.0, gt=0, description="Handshake older than this: the peer is down.")
    vpn_probe_interval: float = Field(30.0, ge=0, description="Seconds between device probes (0: none).")
    vpn_grace: float = Field(30.0, ge=0, description="Start-up: waiting longer for the tunnel is logged as an error.")

    reconcile_schedule: str = Field("*/5 * * * *", description="Reconcile runs: cron, seconds, or off.")
    reconcile_confirm: int = Field(1, ge=1, le=5, description="Readings that must differ before a repair.")
    reconcile_confirm_delay: float = Field(2.0, ge=0, le=300, description="Seconds between those readings.")
    reconcile_pace: float = Field(0.2, ge=0, le=60, description="Seconds between a device's reconcile calls.")
    reconcile_batch: int = Field(8, ge=1, le=1000, description="Devices of a run in the queue at once.")
    reconcile_unreachable_wait: float = Field(120.0, ge=0, le=86400, description="Seconds a reconcile waits for an "
                                              "unreachable device before the run reports it not checked.")
    reconcile_retention_days: int = Field(7, ge=1, le=3650, description="Days finished runs are kept.")
    archive: bool = Field(True, description="Keep settled messages in PGMQ's archive; false deletes them when "
                          "settled (fewer rows written; the audit stays in agent.events).")
    retain_archive_days: int = Field(14, ge=0, le=36500, description="Days settled messages stay archived (0: ever).")
    retain_dlq_days: int = Field(90, ge=0, le=36500, description="Days dead letters are kept (0: ever).")
    retain_events_days: int = Field(180, ge=0, le=36500, description="Days audit events are kept (0: ever).")
    retain_requests_days: int = Field(30, ge=0, le=36500, description="Days request ids are remembered (0: ever).")
    retain_agents_days: int = Field(7, ge=0, le=36500, description="Days the row of an agent that stopped or went "
                                    "silent stays in agent.agents (and `status --fleet`) (0: ever).")
    prune_interval: float = Field(600.0, ge=1, le=86400, description="Seconds between the leader's prune passes.")
    prune_batch: int = Field(1000, ge=1, le=100000, description="Rows removed per statement when pruning.")
    leader_check_interval: float = Field(30.0, gt=0, le=300,
                                         description="Seconds between a standby's tries for leadership.")
    guard_window: float = Field(3600.0, gt=0, le=30 * 86400, description="The guard against mass suspension: "
                                "seconds of the sliding window in which turned-off services are counted.")
    guard_off_min: int = Field(100, ge=0, le=10_000_000, description="Services a site may turn off within the window "
                               "whatever its size; more than this and the percentage are held.")
    guard_off_percent: float = Field(10.0, ge=0, le=100, description="Percent of a site's services on that may be "
                                     "turned off within the window (when above AGENT_GUARD_OFF_MIN); 100: no guard.")

    @model_validator(mode="after")
    def _default_agent_id(self) -> Settings:
        if not self.agent_id:
            self.agent_id = default_agent_id(self.site)
        return self

    @field_validator("reconcile_schedule")
    @classmethod
    def _schedule(cls, value: str) -> str:
        parse_schedule(value)
        return value

    @property
    def schedule(self) -> Schedule:
        return parse_schedule(self.reconcile_schedule)

    @field_validator("http_listen")
    @classmethod
    def _host_port(cls, value: str) -> str:
        if value == "":
            return value
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError("must be host:port, e.g. 127.0.0.1:9477 (empty disables)")
        return value

    @field_validator("database_url", "session_database_url")
    @classmethod
    def _dsn(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("postgres://", "postgresql://")):
            raise ValueError("must be a postgresql:// URL")
        return value

    @property
    def session_dsn(self) -> str:
        """The DSN of the session connection (LISTEN, the leader's lock)."""
        return self.session_database_url or self.database_url

    @property
    def dlq(self) -> str:
        return f"{self.queue}_dlq"

    @property
    def http_host_port(self) -> tuple[str, int] | None:
        if not self.http_listen:
            return None
        host, _, port = self.http_listen.rpartition(":")
        return host.strip("[]"), int(port)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if cls.toml_path is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=cls.toml_path))
        return tuple(sources)


@dataclass(frozen=True)
class LiveSettings:
    """The settings SIGHUP changes at once (*live* in docs/configuration.md), as one frozen snapshot.
    Every part that uses one reads it through the box's accessor (`LiveBox.current`) at each use, so
    a reload reaches all of them together; the others keep the values the agent started with."""

    log_level: str
    poll_interval: float
    max_attempts: int
    retry_base: float
    retry_max: float
    device_timeout: float
    heartbeat_interval: float
    watchdog_stall: float
    guard_window: float
    guard_off_min: int
    guard_off_percent: float

    @classmethod
    def of(cls, settings: Settings) -> LiveSettings:
        return cls(**{f.name: getattr(settings, f.name) for f in fields(cls)})


LIVE = frozenset(f.name for f in fields(LiveSettings))


class LiveBox:
    """The one place the live settings are kept: a frozen snapshot, read through `current()` and
    replaced whole by `swap()` (a reload is applied all at once or not at all)."""

    def __init__(self, first: LiveSettings) -> None:
        self._now = first

    def current(self) -> LiveSettings:
        return self._now

    def swap(self, new: LiveSettings) -> LiveSettings:
        """Make `new` the snapshot every reader sees from now on; returns the one it replaces."""
        old, self._now = self._now, new
        return old


def reloaded(started: Settings, new: Settings) -> tuple[LiveSettings, list[str]]:
    """What a reload to `new` does (pure): the live snapshot to swap in, and the AGENT_* names of the
    settings that changed since the start but need a restart (they keep their values until then)."""
    restart = sorted(k for k in Settings.model_fields
                     if k not in LIVE and k != "agent_id" and getattr(started, k) != getattr(new, k))
    return LiveSettings.of(new), [f"AGENT_{k.upper()}" for k in restart]


DEFAULT_CONFIG = Path("/etc/pgmq-edge-agent/agent.toml")
CONFIG_ENV = "AGENT_CONFIG"
NO_DATABASE = "postgresql://"  # stands in for AGENT_DATABASE_URL where a command needs no database


def config_path(explicit: str | Path | None = None) -> Path | None:
    """The settings file: --config, else $AGENT_CONFIG (empty: none), else DEFAULT_CONFIG if it exists."""
    if explicit:
        return Path(explicit)
    if CONFIG_ENV in os.environ:
        return Path(os.environ[CONFIG_ENV]) if os.environ[CONFIG_ENV] else None
    return DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None


def load_settings(config: str | Path | None = None, *, need_database: bool = True, **overrides: Any) -> Settings:
    """Build settings or raise ConfigError naming the offending AGENT_* variable. Without
    `need_database`, a missing AGENT_DATABASE_URL is allowed (commands that talk to no database)."""
    path = Path(config) if config else None
    if path is not None and not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    Settings.toml_path = path
    try:
        try:
            return Settings(**overrides)
        except ValidationError as exc:
            if need_database or [e["loc"] for e in exc.errors()] != [("database_url",)] or \
                    exc.errors()[0]["type"] != "missing":
                raise
            return Settings(**{**overrides, "database_url": NO_DATABASE})
    except ValidationError as exc:
        raise ConfigError(describe(exc, path)) from None
    except ValueError as exc:  # TOML syntax errors surface as ValueError subclasses
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    finally:
        Settings.toml_path = None


def describe(exc: ValidationError, path: Path | None) -> str:
    lines = []
    for err in exc.errors(include_url=False):
        field = str(err["loc"][0]) if err["loc"] else "?"
        name = f"AGENT_{field.upper()}"
        where = f" (or `{field}` in {path})" if path else ""
        if err["type"] == "missing":
            lines.append(f"{name}{where} is required")
        elif err["type"] == "extra_forbidden":
            lines.append(f"unknown setting `{field}` in {path}")
        else:
            shown = "" if field in _SECRET_FIELDS else f" (got {err.get('input')!r})"
            lines.append(f"{name}{where}: {err['msg']}{shown}")
    return "invalid configuration: " + "; ".join(lines)
