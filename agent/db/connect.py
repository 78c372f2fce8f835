"""Connection failures sorted by what the operator must do (pure; no I/O).

A wrong password, role, database name or sslmode does not heal by retrying: it is a ConfigError
that names AGENT_DATABASE_URL (never echoing the password), so agentd exits 2 at once and the
supervisor's restart policy takes over. Everything else (refused, timed out, starting up, too
many connections) is transient and worth a retry.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

import asyncpg

from agent.errors import ConfigError

SETTING = "AGENT_DATABASE_URL"

# What a statement or a connection attempt raises while the database is not there right now: down,
# restarting, unreachable, the connection cut, or (mid-failover) every host of a multi-host URL a
# standby (asyncpg's TargetServerAttributeNotMatched, an InternalClientError, as is the torn protocol
# state a connection cut mid-statement leaves). Retry later; a refusal that will not heal is `classify`'s.
DB_ERRORS = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError, asyncpg.InternalClientError)

_REMEDIES: tuple[tuple[type[BaseException], str], ...] = (
    (asyncpg.InvalidPasswordError, "the password was refused: check the password in"),
    (asyncpg.InvalidCatalogNameError, "the database does not exist: check the database name in"),
    (asyncpg.InvalidAuthorizationSpecificationError,
     "the role may not log in (unknown role, NOLOGIN, or no pg_hba.conf entry for it): check the user in"),
    (asyncpg.InsufficientPrivilegeError, "the role lacks the CONNECT privilege on the database named in"),
    (asyncpg.ClientConfigurationError, "a connection parameter is invalid in"),
    # asyncpg hands a query parameter it does not know (a typo: ?sslmod=...) to the server as a setting
    (asyncpg.UndefinedObjectError, "the server does not know a parameter (a mistyped query parameter?) in"),
)


def redact(dsn: str) -> str:
    """The DSN without its password, for messages."""
    try:
        parts = urlsplit(dsn)
        if parts.password is None:
            return dsn
        host = parts.netloc.rpartition("@")[2]
        return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))
    except ValueError:
        return "(unparseable URL)"


def reason(exc: BaseException) -> str:
    """Why a connection attempt or statement failed, never empty: a timeout or a connection cut
    often carries no message, and "database unreachable ()" tells the operator nothing."""
    text = str(exc).strip()
    if text:
        return text
    if isinstance(exc, TimeoutError):
        return "no answer in time (TimeoutError): is a pooler in between waiting for a server it cannot reach?"
    if isinstance(exc, (ConnectionError, asyncpg.InterfaceError)):
        return f"the connection was closed without a reason ({type(exc).__name__})"
    return f"{type(exc).__name__} without a message"


def _said(exc: BaseException, dsn: str) -> str:
    text = str(exc)
    password = _password(dsn)
    return text.replace(password, "***") if password else text


def _password(dsn: str) -> str | None:
    try:
        return urlsplit(dsn).password
    except ValueError:
        return None


def classify(exc: BaseException, dsn: str, setting: str = SETTING) -> ConfigError | None:
    """A ConfigError when retrying cannot help, else None (retry later). `setting` names where the
    DSN came from (AGENT_DATABASE_URL or AGENT_SESSION_DATABASE_URL)."""
    where = f"{setting} ({redact(dsn)})"
    for kind, remedy in _REMEDIES:
        if isinstance(exc, kind):
            return ConfigError(f"cannot connect to the database: {remedy} {where}: {_said(exc, dsn)}")
    if isinstance(exc, OSError) and "SSL" in str(exc):  # e.g. sslmode=require, server without SSL
        return ConfigError(f"cannot connect to the database: SSL negotiation failed, check sslmode in {where}: "
                           f"{_said(exc, dsn)}")
    if isinstance(exc, (ValueError, ArithmeticError)) and not isinstance(exc, asyncpg.PostgresError):
        return ConfigError(f"{setting} is not a valid connection URL ({redact(dsn)}): {_said(exc, dsn)}")
    return None
