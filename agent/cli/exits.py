"""agentctl's exit status, one meaning per code across commands (docs/operations.md, `man agentctl`).

0 done; 1 the check failed or something is not healthy (also: the database cannot be reached);
2 bad request or configuration; 3 `sync` not finished in time; 4 what the command names does not
exist (a device, a DLQ entry, an agent, a sync run, a service key, a batch, a site without a queue).
"""

from __future__ import annotations

import asyncpg

OK, FAILED, BAD_REQUEST, TIMED_OUT, NOT_FOUND = 0, 1, 2, 3, 4

# How the database's functions say that what was named does not exist: (SQLSTATE, words in the
# message). agent.enqueue and agent.request_sync say it with 22023 and the words; no_data_found
# (P0002), or reason=unknown_... in DETAIL, wherever a function says it so.
_NOT_FOUND = (("22023", "unknown device"), ("22023", "no device "), ("22023", "unknown site"), ("P0002", ""))


def names_nothing(exc: asyncpg.PostgresError) -> bool:
    """Whether the database refused a request because what it names does not exist (pure)."""
    state, message = getattr(exc, "sqlstate", None), str(exc)
    detail = getattr(exc, "detail", None) or ""
    return "reason=unknown_" in detail or any(state == code and words in message for code, words in _NOT_FOUND)
