"""What the hot statements cost Postgres, one at a time, without agentd and without a second process
competing for the cores: the agent's own `read`, `accept` and `report` statements over a queue of
20,000 commands (200 devices x 100 services), in batches as a drain makes them.

    .venv/bin/python bench/statement_costs.py [--commands 20000] [--batch 1000] [--explain read|device|accept|report]

Reads of 100 (AGENT_BATCH_SIZE) until a batch of --batch (the Reporter's largest) is held; that batch
is accepted in one statement and reported (verified after a write, archived) in one. Prints the time
of each statement per command (wall time on one connection over a Unix socket, so: server time plus
a round trip), the Python time to build the report's parameters, and the WAL written per command.
--explain prints EXPLAIN (ANALYZE, BUFFERS) of one statement halfway through, in a transaction rolled
back (its rows are not written twice; its WAL is counted).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import fresh_db

from agent.contract import parse_command
from agent.db.queries import Queries
from agent.executor.acceptor import Acceptor, GuardLimits, _Pending
from agent.model.outcome import EventRow, Outcome, StateUpdate
from agent.queue.admission import delivery
from agent.queue.reports import report_args


def outcome(d, c, now: float) -> Outcome:  # type: ignore[no-untyped-def]
    """What the executor reports for a command written and verified."""
    def event(kind: str, **kw) -> EventRow:  # type: ignore[no-untyped-def]
        return EventRow(kind, c.device, c.service, d.msg_id, d.version, c.request_id, c.state, attempt=d.attempt,
                        meta=c.meta, **kw)

    state = StateUpdate(c.device, c.service, c.state, d.version, c.state, now, now, now, None, d.msg_id,
                        c.request_id, c.meta)
    return Outcome(d, "archive", [event("verified", observed=c.state, duration_ms=1.0, applied_at=now)], state)


async def explain(conn: asyncpg.Connection, sql: str, *args: object) -> None:
    async with conn.transaction():
        plan = await conn.fetch("EXPLAIN (ANALYZE, BUFFERS) " + sql, *args)
        print("\n".join(r[0] for r in plan))
        raise _RollBack


class _RollBack(Exception):
    pass


async def measure(admin_dsn: str, n: int, batch: int, what: str | None, setup: list[str]) -> None:
    dsn = await fresh_db(admin_dsn, "bench_statements")
    conn = await asyncpg.connect(dsn)
    await conn.execute("SET jit = off")  # as agentd's pool sets it
    q = Queries("device_tasks")
    await conn.executemany("INSERT INTO agent.devices (id, driver) VALUES ($1, 'sim')",
                           [(f"d{i:03}",) for i in range(200)])
    for sql in setup:  # --setup: a statement to try before the commands are sent
        await conn.execute(sql)
    bodies = [json.dumps({"device": f"d{i % 200:03}", "service": f"svc{i // 200:03}", "state": "on"})
              for i in range(n)]
    for start in range(0, n, 5000):
        await conn.execute("SELECT pgmq.send_batch('device_tasks', $1::jsonb[])", bodies[start:start + 5000])
    await conn.execute("CHECKPOINT")
    lsn0 = await conn.fetchval("SELECT pg_current_wal_insert_lsn()::text")
    acceptor = Acceptor(None, q, lambda: GuardLimits("default", off_percent=100.0))  # type: ignore[arg-type]
    t_read = t_accept = t_report = t_args = 0.0
    done = 0
    while done < n:
        rows: list[asyncpg.Record] = []
        while len(rows) < batch:
            t = time.perf_counter()
            got = await conn.fetch(q.read, q.queue, 30, 100, 65536)
            t_read += time.perf_counter() - t
            rows += got
            if len(got) < 100:
                break
        if not rows:
            break
        half = done <= n // 2 < done + len(rows)
        ds = [delivery(r) for r in rows]
        cmds = [parse_command(d.raw) for d in ds]
        pending = [_Pending(c, d.version, d.msg_id, None, False) for d, c in zip(ds, cmds)]  # type: ignore[arg-type]
        if half and what == "read":
            await _try(explain(conn, q.read, q.queue, 30, 100, 65536))
        if half and what == "device":
            await _try(explain(conn, q.read_devices, 30, ["d007"], ["100"], 65536))
        if half and what == "accept":
            cols = json.dumps([[c.device for c in cmds], [c.service for c in cmds], [c.state for c in cmds],
                               [d.version for d in ds], [d.msg_id for d in ds], [None] * len(ds), [False] * len(ds)])
            await _try(explain(conn, q.accept, cols, *acceptor.guard().args()))
        t = time.perf_counter()
        await acceptor._write(conn, pending)
        t_accept += time.perf_counter() - t
        now = time.time()
        outs = [outcome(d, c, now) for d, c in zip(ds, cmds)]
        t = time.perf_counter()
        args = report_args(q, "bench", outs)
        t_args += time.perf_counter() - t
        if half and what == "report":
            await _try(explain(conn, q.report, *args, True, q.queue))
        t = time.perf_counter()
        await conn.fetchrow(q.report, *args, True, q.queue)
        t_report += time.perf_counter() - t
        done += len(rows)
    wal = await conn.fetchval("SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), $1::text::pg_lsn)", lsn0)
    await conn.close()
    await asyncio.sleep(1.0)  # the statistics of a closed connection are flushed
    conn = await asyncpg.connect(dsn)
    hot = await conn.fetch("SELECT relname, n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables "
                           "WHERE n_tup_upd > 0 ORDER BY relname")
    await conn.close()
    us = 1e6 / done
    print(f"{done} commands, batches of {batch}: read {t_read * us:.0f} µs, accept {t_accept * us:.0f} µs, "
          f"report {t_report * us:.0f} µs a command (statements: {(t_read + t_accept + t_report) * us:.0f} µs); "
          f"building the report's parameters {t_args * us:.1f} µs; WAL {wal / done:,.0f} bytes a command; "
          "updates (HOT) " + ", ".join(f"{r['relname']} {r['n_tup_upd']} ({r['n_tup_hot_upd']})" for r in hot))


async def _try(coro) -> None:  # type: ignore[no-untyped-def]
    try:
        await coro
    except _RollBack:
        pass


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--commands", type=int, default=20_000)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--explain", choices=["read", "device", "accept", "report"])
    ap.add_argument("--setup", action="append", default=[], metavar="SQL",
                    help="a statement run before the commands are sent (to try a table setting)")
    args = ap.parse_args()
    import pgserver

    root = Path(tempfile.mkdtemp(prefix="agent-statements-"))
    os.chmod(root, 0o755)
    server = pgserver.get_server(root / "pg", cleanup_mode="delete")
    try:
        await measure(server.get_uri(), args.commands, args.batch, args.explain, args.setup)
    finally:
        server.cleanup()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
