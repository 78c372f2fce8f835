"""The radius policy store's error mapping: what the caller must do about each failure of the SQL store."""

from __future__ import annotations

import asyncpg
import pymysql
import pytest

from agent.drivers import radius_proto as p
from agent.drivers import radius_sql as sql
from agent.drivers.radius_mysql import MySqlStore
from agent.drivers.radius_policy import PolicyStore, open_store
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


# -- MySQL/MariaDB: the same mapping, and the DSN and rows of that dialect -------------------------------------

MY = MySqlStore("mysql://radius:pa55-Word-9@db.example:3306/radius", "radius-db")


@pytest.mark.parametrize("exc", [pymysql.err.OperationalError(1045, "Access denied for user 'radius'@'10.0.0.5'"),
                                 pymysql.err.OperationalError(1049, "Unknown database 'radius'"),
                                 pymysql.err.ProgrammingError(1146, "Table 'radius.radacct' doesn't exist"),
                                 pymysql.err.OperationalError(1142, "DELETE command denied to user 'radius'")])
def test_mysql_what_only_the_operator_can_fix_is_a_config_error_naming_the_credential(exc: Exception) -> None:
    err = MY._mapped(exc, 5.0)
    assert isinstance(err, ConfigError) and "'radius-db'" in str(err) and "pa55-Word-9" not in str(err)


def test_mysql_no_connection_is_unreachable_no_answer_a_timeout_and_the_rest_retried() -> None:
    refused = pymysql.err.OperationalError(2003, "Can't connect to MySQL server on 'db.example' ([Errno 111])")
    assert isinstance(MY._mapped(refused, 5.0), UnreachableError)
    late = MY._mapped(TimeoutError(), 5.0)
    assert isinstance(late, NoAnswerError) and not isinstance(late, UnreachableError)
    assert type(MY._mapped(pymysql.err.OperationalError(1213, "Deadlock found"), 5.0)) is TransientError
    assert type(MY._mapped(pymysql.err.OperationalError(2013, "Lost connection"), 5.0)) is TransientError


@pytest.mark.parametrize("dsn", ["mysql://radius:pa55-Word-9@db.example:99999/radius", "mysql://radius@db.example/",
                                 "mysql://radius:pa55-Word-9@db.example/radius?sslmode=require", "mysql:///radius"])
def test_a_mysql_dsn_that_cannot_be_used_is_a_config_error_that_does_not_show_it(dsn: str) -> None:
    with pytest.raises(ConfigError, match="'radius-db'") as caught:
        open_store(dsn, "radius-db")
    assert "pa55-Word-9" not in str(caught.value)


def test_the_scheme_picks_the_store() -> None:
    assert isinstance(open_store("postgresql://r@h/radius", "c"), PolicyStore)
    assert isinstance(open_store("mariadb://r@h/radius?unix_socket=/run/mysqld/mysqld.sock", "c"), MySqlStore)
    with pytest.raises(ConfigError) as caught:
        open_store("host=db dbname=radius password=pa55-Word-9", "c")
    assert "postgresql://... or mysql://" in str(caught.value) and "pa55-Word-9" not in str(caught.value)


def test_mysql_rows_become_each_users_policy_matched_as_mysql_compares_names() -> None:
    rows = [("g", "alice", "plan", 1, None, None), ("g", "ALICE", "suspended", 0, None, None),
            ("u", "bob", None, None, None, None),
            *[("s", "alice", f"s{i}", i, "" if i else "10.0.0.1", None) for i in range(25)]]
    policies = sql.mysql_policies(["Alice", "bob", "carol"], rows)
    assert policies["Alice"].groups == (("plan", 1), ("suspended", 0)) and policies["Alice"].known
    assert len(policies["Alice"].sessions) == p.MAX_SESSIONS  # the newest first, as the query sorts them
    assert policies["Alice"].sessions[0] == p.Session(0, "s0", "10.0.0.1")
    assert policies["Alice"].sessions[1].framed_ip is None  # MySQL's '' is no address
    assert policies["bob"] == p.Policy("bob", True, ())
    assert policies["carol"] == p.Policy("carol", False, ())


def test_mysql_statements_take_one_placeholder_per_argument() -> None:
    users = ["a", "b", "c"]
    for accounting in (True, False):
        query, args = sql.mysql_read(3, accounting), sql.mysql_read_args(users, "192.0.2.1", accounting)
        assert query.count("%s") == len(args)
    assert sql.mysql_insert_many(3).count("%s") == 9 and sql.mysql_delete_many(3).count("%s") == 4
