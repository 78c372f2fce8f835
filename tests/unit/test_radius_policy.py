"""The radius policy store's error mapping: what the caller must do about each failure of the SQL store."""

from __future__ import annotations

import asyncpg
import pytest

from agent.drivers.radius_policy import PolicyStore
from agent.errors import ConfigError, NoAnswerError, TransientError, UnreachableError

STORE = PolicyStore("postgresql://radius:pa55-Word-9@db.example/radius", "radius-db")


@pytest.mark.parametrize("exc", [asyncpg.InvalidPasswordError("password authentication failed"),
                                 asyncpg.InvalidAuthorizationSpecificationError('role "x" does not exist'),
                                 asyncpg.InvalidCatalogNameError('database "radius" does not exist'),
                                 asyncpg.InsufficientPrivilegeError("permission denied for table radusergroup"),
                                 asyncpg.UndefinedTableError('relation "radacct" does not exist'),
                                 ValueError("invalid DSN postgresql://radius:pa55-Word-9@db.example/radius")])
def test_what_only_the_operator_can_fix_is_a_config_error_naming_the_credential(exc: Exception) -> None:
    err = STORE._mapped(exc, 5.0)
    assert isinstance(err, ConfigError) and "'radius-db'" in str(err)
    assert "pa55-Word-9" not in str(err)


def test_no_connection_is_unreachable_and_no_answer_is_a_timeout() -> None:
    assert isinstance(STORE._mapped(ConnectionRefusedError(111, "Connection refused"), 5.0), UnreachableError)
    late = STORE._mapped(TimeoutError(), 5.0)
    assert isinstance(late, NoAnswerError) and not isinstance(late, UnreachableError)


def test_anything_else_is_retried() -> None:
    for exc in (asyncpg.SerializationError("could not serialize access"),
                asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
                asyncpg.InterfaceError("cannot perform operation: another operation is in progress")):
        assert type(STORE._mapped(exc, 5.0)) is TransientError
