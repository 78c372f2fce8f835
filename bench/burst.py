"""Month-end burst benchmark: coalescing per device, device-bound drain, memory and connections.

    .venv/bin/python bench/burst.py [--runs 2] [--only one|par|many] [--order interleaved|grouped]

Scenarios (the real agentd as a subprocess at default settings, a throwaway Postgres from pgserver):
  one   2,000 commands for ONE sim device, 10 ms per call, distinct services, max_parallel 1;
        target: drained within 1.3 x (writes x 10 ms + the batch reads x 10 ms)
  par   the same with the device option max_parallel=4; target 1.3 x a quarter of that
  many  50,000 commands over 500 sim devices at 50 ms per call (100 distinct services each);
        target: at least 90 % of the device-bound limit, where the limit is
        (one read + writes + one read per take of up to AGENT_COALESCE) x latency per device,
        times the number of devices / AGENT_CONCURRENCY; agentd RSS <= 100 MB throughout
        (max of VmRSS sampled every 0.1 s); connections held by agentd (pg_stat_activity,
        application_name LIKE 'agentd%') within what the settings allow.

Drain time is measured from the commit of the one pgmq.send_batch (the agent is already started
and idle) to the newest archived_at: wake-up, every read, device call, report and archive inside.
Prints PASS/MISS against each target.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pipeline import agentd, cpu_seconds, fresh_db, stop, verdict

COALESCE = 100      # AGENT_COALESCE default
CONCURRENCY = 32    # AGENT_CONCURRENCY default
CONN_BOUND = 7      # pool max_size 6 (AGENT_POOL_SIZE) + the one session connection (LISTEN, leadership)
RSS_TARGET_MB = 100


def machine(pg_version: str) -> str:
    with open("/proc/meminfo") as f:
        mem = int(f.readline().split()[1]) / 1024 / 1024
    load = os.getloadavg()
    return (f"{os.cpu_count()} cores, {mem:.0f} GiB, {platform.python_implementation()} {platform.python_version()}, "
            f"PostgreSQL {pg_version} (pgserver, Unix socket); load average before run "
            f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (shared machine: other work runs on it)")


PG_DATA: Path | None = None  # the benchmark's own cluster: its postmaster and children only


def postgres_pids() -> list[int]:
    """The processes of this benchmark's cluster (not other postgres servers on the machine)."""
    if PG_DATA is None:
        return []
    master = int((PG_DATA / "postmaster.pid").read_text().split()[0])
    kids = subprocess.run(["pgrep", "-P", str(master)], capture_output=True, text=True).stdout.split()
    return [master, *map(int, kids)]


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


async def wait_ready(conn: asyncpg.Connection, proc: subprocess.Popen[bytes]) -> None:
    """agentd has registered itself (agent.agents) and its session connection is up."""
    deadline = time.monotonic() + 60
    while True:
        n = await conn.fetchval("SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'agentd session %'")
        a = await conn.fetchval("SELECT count(*) FROM agent.agents")
        if n and a:
            break
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("agentd did not start")
        await asyncio.sleep(0.1)
    await asyncio.sleep(1.0)


TABLE_STATS = """SELECT schemaname || '.' || relname AS t, n_tup_ins AS ins, n_tup_upd AS upd, n_tup_del AS del
                 FROM {view} WHERE n_tup_ins + n_tup_upd + n_tup_del > 0"""


async def table_stats(conn: asyncpg.Connection, view: str = "pg_stat_user_tables") -> dict[str, tuple[int, int, int]]:
    """Rows inserted, updated, deleted per table (cumulative; or this transaction's, with pg_stat_xact_*)."""
    await conn.execute("SELECT pg_stat_clear_snapshot()")
    return {r["t"]: (r["ins"], r["upd"], r["del"]) for r in await conn.fetch(TABLE_STATS.format(view=view))}


def stats_delta(before: dict, after: dict, minus: dict) -> dict[str, tuple[int, int, int]]:
    out = {}
    for t in after:
        d = tuple(a - b - m for a, b, m in zip(after[t], before.get(t, (0, 0, 0)), minus.get(t, (0, 0, 0))))
        if any(d):
            out[t] = d
    return out


async def xacts(conn: asyncpg.Connection) -> int:
    await conn.execute("SELECT pg_stat_clear_snapshot()")
    return await conn.fetchval("SELECT xact_commit + xact_rollback FROM pg_stat_database "
                               "WHERE datname = current_database()")


async def send_all(conn: asyncpg.Connection, bodies: list[str]) -> tuple[datetime, dict, str]:
    """All messages in one transaction; returns the database clock right after the commit, the
    rows the producer itself wrote (to subtract from the consumer's counts) and the WAL position
    just before the commit (the consumer's WAL is counted from there)."""
    async with conn.transaction():
        for start in range(0, len(bodies), 5000):
            await conn.execute("SELECT pgmq.send_batch('device_tasks', $1::jsonb[])", bodies[start:start + 5000])
        mine = await table_stats(conn, "pg_stat_xact_user_tables")
        lsn = await wal_position(conn)
    return await conn.fetchval("SELECT clock_timestamp()"), mine, lsn


async def checkpoint(conn: asyncpg.Connection) -> None:
    """A checkpoint before each side's drain: each then writes the same share of full-page images
    (the first change of a page after a checkpoint logs the whole page), not whatever share the
    timing of the last automatic checkpoint gave it."""
    await conn.execute("CHECKPOINT")


async def wal_position(conn: asyncpg.Connection) -> str:
    return str(await conn.fetchval("SELECT pg_current_wal_insert_lsn()::text"))


async def wal_since(conn: asyncpg.Connection, lsn: str) -> int:
    """WAL bytes written cluster-wide since `lsn` (the bench's own polling writes none)."""
    return int(await conn.fetchval("SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), $1::text::pg_lsn)", lsn))


def per_command(delta: dict[str, tuple[int, int, int]], n: int) -> str:
    rows = sorted(delta.items(), key=lambda kv: -sum(kv[1]))
    total = sum(sum(v) for v in delta.values())
    parts = [f"{t} {'/'.join(f'{x / n:.2f}' for x in v)}" for t, v in rows]
    return f"{total / n:.2f} rows written per command (ins/upd/del by table: {', '.join(parts)})"


async def drain(admin_dsn: str, db: str, devices: list[tuple[str, dict]], bodies: list[str],
                env: dict[str, str] | None = None, timeout: float = 900, log_file: Path | None = None) -> dict:
    """Run agentd against a fresh database holding these devices, send the bodies at once, wait
    until every message is archived; samples RSS and connections meanwhile."""
    dsn = await fresh_db(admin_dsn, db)
    conn = await asyncpg.connect(dsn)
    await conn.executemany("INSERT INTO agent.devices (id, driver, options) VALUES ($1, 'sim', $2::jsonb)",
                           [(d, json.dumps(o)) for d, o in devices])
    proc = agentd(dsn, **(env or {}))
    total = len(bodies)
    rss_max, conns_max = 0.0, 0
    try:
        await wait_ready(conn, proc)
        before, x0 = await table_stats(conn), await xacts(conn)
        log_start = log_file.stat().st_size if log_file else 0
        await checkpoint(conn)
        cpu0 = (cpu_seconds([proc.pid]), cpu_seconds(postgres_pids()))
        # BENCH_PERF=<file>: `perf record -a -g` of the machine from the send to the drain's end
        # (BENCH_PERF_ARGS: perf's sampling options, "-g" by default; "--call-graph dwarf" for Postgres' stacks)
        perf = (subprocess.Popen(["perf", "record", "-a", *os.environ.get("BENCH_PERF_ARGS", "-g").split(), "-q",
                                  "-o", os.environ["BENCH_PERF"]]) if os.environ.get("BENCH_PERF") else None)
        wall0 = time.monotonic()
        t0, mine, lsn0 = await send_all(conn, bodies)
        deadline = time.monotonic() + timeout
        last_conn_sample = 0.0
        while True:
            rss_max = max(rss_max, rss_mb(proc.pid))
            if time.monotonic() - last_conn_sample > 0.5:
                last_conn_sample = time.monotonic()
                conns_max = max(conns_max, await conn.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'agentd%'"))
                n = await conn.fetchval('SELECT count(*) FROM pgmq."a_device_tasks"')
                if n >= total:
                    wal, lsn1 = await wal_since(conn, lsn0), await wal_position(conn)
                    break
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"drain did not finish ({n} of {total} archived)")
            await asyncio.sleep(0.1)
        wall = time.monotonic() - wall0
        cpu1 = (cpu_seconds([proc.pid]), cpu_seconds(postgres_pids()))
        if perf:
            perf.send_signal(signal.SIGINT)
            perf.wait()
    finally:
        stop(proc)
    last = await conn.fetchval('SELECT max(archived_at) FROM pgmq."a_device_tasks"')
    left = await conn.fetchval('SELECT count(*) FROM pgmq."q_device_tasks"')
    dlq = await conn.fetchval('SELECT count(*) FROM pgmq."q_device_tasks_dlq"')
    wrong = await conn.fetchval("SELECT count(*) FROM agent.service_state WHERE observed IS DISTINCT FROM 'on'")
    kinds = dict(await conn.fetch("SELECT kind, count(*) FROM agent.events GROUP BY kind"))
    first = await conn.fetchval('SELECT min(archived_at) FROM pgmq."a_device_tasks"')
    if os.environ.get("BENCH_TIMELINE"):  # where the drain's time went: messages archived per 100 ms after the send
        rows = await conn.fetch('SELECT floor(extract(epoch FROM archived_at - $1) * 10)::int AS slot, count(*) AS n '
                                'FROM pgmq."a_device_tasks" GROUP BY 1 ORDER BY 1', t0)
        print("archived per 100 ms after the send:", " ".join(f"{r['slot']}:{r['n']}" for r in rows), flush=True)
    await conn.close()
    await asyncio.sleep(1.0)
    conn = await asyncpg.connect(dsn)  # the bench's own connection has flushed its statistics on close
    after, x1 = await table_stats(conn), await xacts(conn)
    await conn.close()
    return {"seconds": (last - t0).total_seconds(), "wall": wall, "first_to_last": (last - first).total_seconds(),
            "log_start": log_start, "tuples": stats_delta(before, after, mine), "xacts": x1 - x0, "left": left,
            "dlq": dlq, "wrong": wrong, "wal_bytes": wal, "wal_range": (lsn0, lsn1),
            "events": kinds, "rss_max": rss_max, "conns_max": conns_max,
            "agent_cpu": cpu1[0] - cpu0[0], "postgres_cpu": cpu1[1] - cpu0[1]}


def one_device(n: int, latency: float, max_parallel: int) -> tuple[list[tuple[str, dict]], list[str]]:
    opts: dict = {"latency": latency}
    if max_parallel != 1:
        opts["max_parallel"] = max_parallel
    bodies = [json.dumps({"device": "bras-1", "service": f"pppoe:c{i:05}", "state": "on"}) for i in range(n)]
    return [("bras-1", opts)], bodies


def many_devices(n: int, devices: int, latency: float, order: str) -> tuple[list[tuple[str, dict]], list[str]]:
    per = n // devices
    if order == "interleaved":  # as billing emits them: customer by customer, routers mixed
        keys = [(i % devices, i // devices) for i in range(n)]
    else:                       # grouped by router
        keys = [(i // per, i % per) for i in range(n)]
    bodies = [json.dumps({"device": f"r{d:03}", "service": f"pppoe:c{s:03}", "state": "on"}) for d, s in keys]
    return [(f"r{d:03}", {"latency": latency}) for d in range(devices)], bodies


def summary(r: dict) -> str:
    ev = ", ".join(f"{k} {v}" for k, v in sorted(r["events"].items()))
    return (f"{r['left']} left, {r['dlq']} in DLQ, {r['wrong']} not verified on; events: {ev}; "
            f"CPU agentd {r['agent_cpu']:.1f} s, postgres {r['postgres_cpu']:.1f} s; "
            f"RSS max {r['rss_max']:.1f} MB; agentd connections max {r['conns_max']}")


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=2, help="runs of each scenario (median reported)")
    ap.add_argument("--only", choices=["one", "par", "many"], action="append")
    ap.add_argument("--commands", type=int, default=2000)
    ap.add_argument("--many-commands", type=int, default=50_000)
    ap.add_argument("--many-devices", type=int, default=500)
    ap.add_argument("--order", choices=["interleaved", "grouped"], default="interleaved",
                    help="order of the 50,000 sends: customer by customer (routers mixed) or router by router")
    ap.add_argument("--concurrency", type=int, default=None, help="AGENT_CONCURRENCY for 'many' (default: agentd's)")
    ap.add_argument("--prefetch", type=int, default=None, help="AGENT_PREFETCH for 'many' (default: agentd's)")
    args = ap.parse_args()
    only = set(args.only or ["one", "par", "many"])
    import pgserver

    root = Path(tempfile.mkdtemp(prefix="agent-burst-"))
    os.chmod(root, 0o755)
    server = pgserver.get_server(root / "pg", cleanup_mode="delete")
    global PG_DATA
    PG_DATA = root / "pg"
    try:
        admin = server.get_uri()
        conn = await asyncpg.connect(admin)
        pg_version = await conn.fetchval("SHOW server_version")
        await conn.close()
        print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
        print(f"date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; git {git_rev()}")
        print(f"machine: {machine(pg_version)}")
        print("agentd settings: defaults (AGENT_COALESCE 100, AGENT_CONCURRENCY 32, AGENT_BATCH_SIZE 100, "
              "AGENT_PREFETCH 1000), log level WARNING")
        n = args.commands
        reads = 2 * math.ceil(n / COALESCE)
        serial = n * 0.010 + reads * 0.010
        for key, mp, target in (("one", 1, 1.3 * serial), ("par", 4, 1.3 * serial / 4)):
            if key not in only:
                continue
            times = []
            for run in range(1, args.runs + 1):
                devices, bodies = one_device(n, 0.010, mp)
                r = await drain(admin, f"bench_burst_{key}", devices, bodies)
                times.append(r["seconds"])
                print(f"burst {key} run {run}: {n} commands, one sim device, 10 ms per call, max_parallel {mp}: "
                      f"drained in {r['seconds']:.2f} s; {summary(r)}")
            med = statistics.median(times)
            print(f"burst max_parallel {mp}: median {med:.2f} s of {len(times)} runs ({min(times):.2f} - "
                  f"{max(times):.2f}) [target <= {target:.2f} s = 1.3 x ({n} writes + {reads} batch reads) x 10 ms"
                  f"{' / 4' if mp == 4 else ''}: {verdict(med <= target)}]")
        if "many" in only:
            nm, nd, lat = args.many_commands, args.many_devices, 0.05
            conc = args.concurrency or CONCURRENCY
            per = nm // nd
            calls = per + 2 * math.ceil(per / COALESCE)
            limit = calls * lat * math.ceil(nd / conc)
            limit_fluid = calls * lat * nd / conc
            env = {"AGENT_CONCURRENCY": str(conc)} if args.concurrency else {}
            if args.prefetch:
                env["AGENT_PREFETCH"] = str(args.prefetch)
            if env:
                print(f"burst many: settings changed from the defaults: {env}")
            times, rss, conns = [], [], []
            for run in range(1, args.runs + 1):
                devices, bodies = many_devices(nm, nd, lat, args.order)
                r = await drain(admin, "bench_burst_many", devices, bodies, env)
                times.append(r["seconds"])
                rss.append(r["rss_max"])
                conns.append(r["conns_max"])
                print(f"burst many run {run}: {nm} commands over {nd} sim devices ({per} services each, sent "
                      f"{args.order}), 50 ms per call, concurrency {conc}: drained in {r['seconds']:.2f} s = "
                      f"{nm / r['seconds']:,.0f} commands/s; {summary(r)}")
            med = statistics.median(times)
            share = limit_fluid / med
            print(f"burst many: device-bound limit {limit_fluid:.1f} s = {calls} calls per device ({per} writes + "
                  f"{calls - per} reads) x 50 ms x {nd} devices / {conc} at once ({limit:.1f} s in whole rounds); "
                  f"median {med:.2f} s of {len(times)} runs = {share:.0%} of the limit "
                  f"[target >= 90 %: {verdict(share >= 0.9)}]")
            print(f"burst many: agentd RSS max {max(rss):.1f} MB [target <= {RSS_TARGET_MB}: "
                  f"{verdict(max(rss) <= RSS_TARGET_MB)}]; connections held by agentd max {max(conns)} "
                  f"[bound {CONN_BOUND} = pool 6 + session: {verdict(max(conns) <= CONN_BOUND)}]")
    finally:
        server.cleanup()
        shutil.rmtree(root, ignore_errors=True)


def git_rev() -> str:
    here = Path(__file__).resolve().parents[1]
    rev = subprocess.run(["git", "-C", str(here), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--", "agent"],
                           capture_output=True, text=True).stdout.strip()
    return rev.stdout.strip() + (" (agent/ with uncommitted changes)" if dirty else "")


if __name__ == "__main__":
    asyncio.run(main())
