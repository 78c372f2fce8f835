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


class NoAnswerError(TransientError):
    """The device did not answer at all (timed out): the device, or a tunnel on the way, is down.
    The VPN guard decides which before such work is given up."""

    kind = "no_answer"


class UnreachableError(NoAnswerError):
    """The device cannot be reached at all (cannot connect, no route)."""

    kind = "unreachable"


class PermanentError(AgentError):
    """Retrying cannot help: bad message, unknown device, a 4xx from the device. Dead-letter it."""

    kind = "permanent"


class ConfigError(AgentError):
    """The agent is set up wrongly: refuse to start and say which setting."""

    kind = "config"


class NotFoundError(PermanentError):
    """What the caller named (a device, a DLQ entry, an agent, a run) does not exist: retrying cannot
    help, and `agentctl` exits 4 for it, whatever the command (agent/cli/exits.py)."""

    kind = "not_found"
