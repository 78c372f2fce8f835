"""Every SQL statement of the radius policy store, in both dialects it speaks, and nothing else.

The tables are FreeRADIUS's rlm_sql schema in both; what differs, and only here:
- placeholders: PostgreSQL (asyncpg) `$1`; MySQL/MariaDB (aiomysql) `%s`;
- a list of users: PostgreSQL binds one array (`unnest`, `= ANY`); MySQL has no arrays, so each statement
  is made for `n` users (`IN (%s, ...)`), and the store sends at most CHUNK users per statement;
- how a user's policy comes back: PostgreSQL one row per user with JSON arrays of its groups and open
  sessions; MySQL tagged rows (g: a group, u: a radcheck/radreply row, s: an open session) that
  `mysql_policies` groups by user, matching names as MySQL's default collations compare them (case aside);
- the suspended row's replacement: PostgreSQL one statement (a DELETE in a CTE, then the INSERT); MySQL a
  DELETE then an INSERT in one transaction;
- types and functions: addresses are `inet` in PostgreSQL and varchar in MySQL (where '' is none); the
  seconds of a session are extract(epoch ...) there and TIMESTAMPDIFF here.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TypeVar

from agent.drivers import radius_proto as p

T = TypeVar("T")

# -- PostgreSQL ----------------------------------------------------------------------------------

# Per user: is it known at all, its groups, and (with accounting) its open sessions on this NAS.
PG_READ = """
SELECT u.name,
       EXISTS (SELECT 1 FROM radcheck WHERE username = u.name)
         OR EXISTS (SELECT 1 FROM radreply WHERE username = u.name)
         OR EXISTS (SELECT 1 FROM radusergroup WHERE username = u.name) AS known,
       (SELECT coalesce(json_agg(json_build_array(groupname, priority)), '[]')
          FROM radusergroup WHERE username = u.name) AS groups,
       (SELECT coalesce(json_agg(json_build_array(s.radacctid, s.acctsessionid, host(s.framedipaddress))), '[]')
          FROM (SELECT radacctid, acctsessionid, framedipaddress FROM radacct
                 WHERE $3 AND username = u.name AND nasipaddress = $2::inet AND acctstoptime IS NULL
                 ORDER BY acctstarttime DESC NULLS LAST LIMIT $4) s) AS sessions
  FROM unnest($1::text[]) AS u(name)
"""
# The suspended group's row, placed before every other group of the user; one row, whatever was there.
PG_SUSPEND = """
WITH gone AS (DELETE FROM radusergroup WHERE username = $1 AND groupname = $2)
INSERT INTO radusergroup (username, groupname, priority) VALUES ($1, $2, $3)
"""
PG_RESTORE = "DELETE FROM radusergroup WHERE username = $1 AND groupname = $2"
# A month-end take: every user's suspended row in one statement ($1 users, $3 their priorities).
PG_SUSPEND_MANY = """
WITH w AS (SELECT * FROM unnest($1::text[], $3::integer[]) AS w(username, priority)),
gone AS (DELETE FROM radusergroup g USING w WHERE g.username = w.username AND g.groupname = $2)
INSERT INTO radusergroup (username, groupname, priority) SELECT w.username, $2, w.priority FROM w
"""
PG_RESTORE_MANY = "DELETE FROM radusergroup WHERE username = ANY($1::text[]) AND groupname = $2"
# A session the NAS says it does not have (Error-Cause 503): its Accounting-Stop was lost.
PG_CLOSE_STALE = """
UPDATE radacct SET acctstoptime = now(), acctupdatetime = now(),
       acctsessiontime = greatest(0, extract(epoch FROM now() - acctstarttime))::bigint,
       acctterminatecause = 'Session-Context-Not-Found'
 WHERE radacctid = $1 AND acctstoptime IS NULL
"""
PG_STILL_OPEN = "SELECT radacctid FROM radacct WHERE radacctid = ANY($1::bigint[]) AND acctstoptime IS NULL"
# A suspension into a group without check or reply attributes suspends nobody.
PG_GROUP_DEFINED = """
SELECT (SELECT count(*) FROM radgroupcheck WHERE groupname = $1)
     + (SELECT count(*) FROM radgroupreply WHERE groupname = $1)
"""

# -- MySQL / MariaDB ------------------------------------------------------------------------------

CHUNK = 500  # users per statement (placeholders, not arrays)


def _in(n: int) -> str:
    return ", ".join(["%s"] * n)


def mysql_read(n: int, accounting: bool) -> str:
    """Tagged rows for `n` users (arguments: `mysql_read_args`): kind, username, text, number, address."""
    parts = [f"SELECT 'g' AS kind, username, groupname AS a, priority AS b, NULL AS c, NULL AS d "
             f"FROM radusergroup WHERE username IN ({_in(n)})",
             f"SELECT 'u', username, NULL, NULL, NULL, NULL FROM radcheck WHERE username IN ({_in(n)})",
             f"SELECT 'u', username, NULL, NULL, NULL, NULL FROM radreply WHERE username IN ({_in(n)})"]
    if accounting:
        parts.append(f"SELECT 's', username, acctsessionid, radacctid, framedipaddress, acctstarttime FROM radacct "
                     f"WHERE username IN ({_in(n)}) AND nasipaddress = %s AND acctstoptime IS NULL")
    return " UNION ALL ".join(parts) + " ORDER BY 6 DESC"  # newest session first (NULL last)


def mysql_read_args(users: Sequence[str], nas_ip: str, accounting: bool) -> list[object]:
    return [*users, *users, *users, *users, nas_ip] if accounting else [*users, *users, *users]


def mysql_policies(users: Sequence[str], rows: Iterable[Sequence[object]]) -> dict[str, p.Policy]:
    """The tagged rows of `mysql_read` as one Policy per user asked for."""
    asked: dict[str, list[str]] = {}
    for user in users:
        asked.setdefault(user.casefold(), []).append(user)
    known: set[str] = set()
    groups: dict[str, list[tuple[str, int]]] = {u: [] for u in users}
    sessions: dict[str, list[p.Session]] = {u: [] for u in users}
    for kind, name, a, b, c, _ in rows:
        for user in asked.get(str(name).casefold(), ()):
            if kind != "s":
                known.add(user)
            if kind == "g":
                groups[user].append((str(a), int(b)))  # type: ignore[call-overload]
            elif kind == "s" and len(sessions[user]) < p.MAX_SESSIONS:
                sessions[user].append(p.Session(int(b), str(a), str(c) if c else None))  # type: ignore[call-overload]
    return {u: p.Policy(u, u in known, tuple(groups[u]), tuple(sessions[u])) for u in users}


MYSQL_DELETE = "DELETE FROM radusergroup WHERE username = %s AND groupname = %s"
MYSQL_INSERT = "INSERT INTO radusergroup (username, groupname, priority) VALUES (%s, %s, %s)"


def mysql_delete_many(n: int) -> str:
    """The suspended group's rows of `n` users (arguments: the group, then the users)."""
    return f"DELETE FROM radusergroup WHERE groupname = %s AND username IN ({_in(n)})"


def mysql_insert_many(n: int) -> str:
    """`n` suspended rows in one INSERT (arguments: username, groupname, priority for each)."""
    return "INSERT INTO radusergroup (username, groupname, priority) VALUES " + ", ".join(["(%s, %s, %s)"] * n)


MYSQL_CLOSE_STALE = """
UPDATE radacct SET acctstoptime = NOW(), acctupdatetime = NOW(),
       acctsessiontime = GREATEST(0, TIMESTAMPDIFF(SECOND, acctstarttime, NOW())),
       acctterminatecause = 'Session-Context-Not-Found'
 WHERE radacctid = %s AND acctstoptime IS NULL
"""


def mysql_still_open(n: int) -> str:
    return f"SELECT radacctid FROM radacct WHERE radacctid IN ({_in(n)}) AND acctstoptime IS NULL"


MYSQL_GROUP_DEFINED = """
SELECT (SELECT COUNT(*) FROM radgroupcheck WHERE groupname = %s)
     + (SELECT COUNT(*) FROM radgroupreply WHERE groupname = %s)
"""


def chunks(items: Sequence[T], size: int = CHUNK) -> list[Sequence[T]]:
    return [items[i:i + size] for i in range(0, len(items), size)]
