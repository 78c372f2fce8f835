"""Load the named SQL blocks of queries.sql, with the queue's table identifiers filled in."""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import cache
from importlib.resources import files

from agent.model.priority import HIGH_SQL

_NAME = re.compile(r"^-- name: (\w+)\s*$", re.M)


@cache
def _blocks() -> dict[str, str]:
    text = files("agent.db").joinpath("queries.sql").read_text()
    parts = _NAME.split(text)
    return {parts[i]: _strip(parts[i + 1]) for i in range(1, len(parts), 2)}


def _strip(body: str) -> str:
    lines = [ln for ln in body.strip().splitlines() if not ln.startswith("--")]
    return "\n".join(lines).strip().rstrip(";")


def _fill(body: str, idents: dict[str, str]) -> str:
    for key, ident in idents.items():
        body = body.replace("{" + key + "}", ident)
    return body


def as_text(numbers: Iterable[float]) -> list[str]:
    """Numbers for a statement's `$n::text[]::bigint[]` (or integer[], double precision[]). asyncpg
    knows text[] from the start, but an array of numbers only after asking the server about its
    type: three round trips and a catalog query on each new pooled connection, in the middle of the
    burst that opened it. The daemon's statements take and return no such array (a test holds them to it)."""
    return [repr(n) for n in numbers]


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class Queries:
    """The statements for one queue. `queue` is validated by Settings (lowercase, digits, _)."""

    def __init__(self, queue: str) -> None:
        dlq = f"{queue}_dlq"
        idents = {
            "q": quote_ident(f"q_{queue}"),
            "a": quote_ident(f"a_{queue}"),
            "dq": quote_ident(f"q_{dlq}"),
            "da": quote_ident(f"a_{dlq}"),
            "qdev": quote_ident(f"q_{queue}_device_idx"),
            "qhigh": quote_ident(f"q_{queue}_high_idx"),
            "qheld": quote_ident(f"q_{queue}_held_idx"),
            "qvt": quote_ident(f"q_{queue}_vt_idx"),
            "aat": quote_ident(f"archived_at_idx_{queue}"),  # PGMQ's name for it
            "high": HIGH_SQL,  # not an identifier: the priority rule, the same text everywhere
        }
        self.queue = queue
        self.dlq = dlq
        self.channel = f"pgmq.q_{queue}.INSERT"  # PGMQ's insert notifications (asyncpg quotes the dots)
        self._sql = {name: _fill(body, idents) for name, body in _blocks().items()}

    def __getattr__(self, name: str) -> str:
        try:
            return self.__dict__["_sql"][name]
        except KeyError:
            raise AttributeError(f"no query named {name!r} in queries.sql") from None
