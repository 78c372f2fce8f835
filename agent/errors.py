"""Errors sorted by what the caller must do.

Every failure that crosses a module boundary is one of these; library exceptions
(aiohttp, asyncpg, OSError) are translated once at the edge that caught them.
"""


class AgentError(Exception):
    """Root of every error the agent raises on purpose."""

    kind = "error"


class TransientError(AgentError):
    """Retry later with backoff: timeouts, connection errors, 5xx, a failed read-back."""

    kind = "transient"


class UnreachableError(TransientError):
    """The device cannot be reached at all (no route, tunnel down): park, do not burn attempts."""

    kind = "unreachable"


class PermanentError(AgentError):
    """Retrying cannot help: bad message, unknown device, a 4xx from the device. Dead-letter it."""

    kind = "permanent"


class ConfigError(AgentError):
    """The agent is set up wrongly: refuse to start and say which setting."""

    kind = "config"
