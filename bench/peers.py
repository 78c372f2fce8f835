"""The agent beside a no-op job queue: agentd at default settings vs pgqueuer 1.6, side by side.

    .venv/bin/pip install -r bench/requirements.txt     # pgqueuer==1.6.0, a benchmark peer only
    .venv/bin/python bench/peers.py [--runs 2] [--wake-samples 200] [--no-statements] [--idle-seconds 60]
                                    [--wal-stats]

One throwaway Postgres (pgserver, Unix socket), a fresh database for each side of each run:
  drain  agentd (subprocess, default settings) drains 20,000 distinct commands (200 zero-latency sim
         devices x 100 services, each a read, write and read-back, coalesced per device) against
         pgqueuer (subprocess, QueueManager.run() with its defaults, durable schema from
         Queries.install()) draining 20,000 no-op jobs. Both consumers are started and idle first; all
         messages are sent in one transaction; drain time = newest completion (archived_at / the
         'successful' row in pgqueuer_log) minus the commit of the send. Runs alternate which side goes
         first. Target: agent jobs/s >= pgqueuer jobs/s (median ratio of the runs).
  rows   rows inserted/updated/deleted per command by table (pg_stat_user_tables deltas, the
         producer's own rows subtracted) and transactions per command, for both.
  WAL    WAL bytes per command: a CHECKPOINT before each side's drain (each then logs the same share
         of full-page images), counted from the WAL position just before the send's commit to the
         drain's end (pg_current_wal_insert_lsn; cluster-wide, the bench's polling writes none);
         --wal-stats adds pg_waldump --stats=record over that range, by record type.
  stmts  statements per command, and the server's time executing them, from the server log
         (log_min_duration_statement = 0; pg_stat_statements is not in pgserver's build) in one more
         drain of each side, pgqueuer at batch 10 and at batch 100 (slower than the timed runs;
         counted by application_name). The durations are wall time inside Postgres: while agentd
         and the backends share two cores they include waiting for a core.
  table  the last run's drains/s, rows, transactions, WAL bytes and statements per verified command
         (agentd) and per job (pgqueuer) side by side.
  wake   isolated messages 0.3 s apart: pgmq.send -> first device call (in-process agent, recording
         driver, bench/pipeline.py) and enqueue -> job start (in-process pgqueuer), after one
         uncounted warm-up message each; p50 and p99 by nearest rank (of 200, the 198th).
         Targets: agent p50 <= pgqueuer p50, agent p99 <= 20 ms.
  idle   bench/pipeline.py's measurement at default settings: <= 12 statements a minute.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent))

import burst
from burst import (
    checkpoint,
    cpu_seconds,
    git_rev,
    machine,
    per_command,
    postgres_pids,
    stats_delta,
    summary,
    table_stats,
    wal_position,
    wal_since,
    xacts,
)
from pipeline import idle_statements, summarize, verdict, wait_for_key, wake_latency

PGQ_APP = "pgq-bench-worker"


# -- pgqueuer side ---------------------------------------------------------------------------------

async def pgq_db(admin_dsn: str, name: str) -> str:
    from pgqueuer import Queries

    conn = await asyncpg.connect(admin_dsn)
    await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    await conn.execute(f'CREATE DATABASE "{name}"')
    await conn.close()
    dsn = admin_dsn.replace("/postgres?", f"/{name}?")
    conn = await asyncpg.connect(dsn)
    await Queries.from_asyncpg_connection(conn).install()  # what `pgq install` does (durability durable)
    await conn.close()
    return dsn


async def pgq_worker(dsn: str, jobs: int, batch_size: int | None = None) -> None:
    """The peer: a QueueManager with one no-op entrypoint, run() at its defaults (or another
    batch_size); stops after `jobs`."""
    from pgqueuer import Queries, QueueManager

    conn = await asyncpg.connect(dsn, server_settings={"application_name": PGQ_APP})
    qm = QueueManager(Queries.from_asyncpg_connection(conn))
    done = 0
    if PGQ_GC:  # agentd's collector setting, given to the peer's worker once it is set up
        from agent.runtime.collector import settle

        settle()

    @qm.entrypoint("noop")
    async def noop(job: object) -> None:
        nonlocal done
        done += 1
        if done >= jobs:
            qm.shutdown.set()

    await (qm.run(batch_size=batch_size) if batch_size else qm.run())
    await conn.close()


PGQ_UVLOOP = False  # --pgq-uvloop: the worker on uvloop, as pgqueuer's own CLI (`pgq run`) runs it
PGQ_GC = False  # --pgq-gc: the worker's garbage collector set as agentd sets its own (agent/runtime/collector.py)


def pgq_process(dsn: str, jobs: int, batch_size: int | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, __file__, *(["--pgq-uvloop"] if PGQ_UVLOOP else []),
                             *(["--pgq-gc"] if PGQ_GC else []), "--pgq-worker", dsn,
                             str(jobs), *([str(batch_size)] if batch_size else [])])


def bodies(devices: int, services: int) -> list[str]:
    """Distinct (device, service) keys, routers mixed as a producer emits them."""
    return [json.dumps({"device": f"d{i % devices:03}", "service": f"svc{i // devices:03}", "state": "on"})
            for i in range(devices * services)]


async def pgq_drain(admin_dsn: str, payloads: list[str], log_file: Path | None = None,
                    batch_size: int | None = None) -> dict:
    dsn = await pgq_db(admin_dsn, "bench_peer_pgq")
    from pgqueuer import Queries

    conn = await asyncpg.connect(dsn)
    n = len(payloads)
    proc = pgq_process(dsn, n, batch_size)
    try:
        deadline = time.monotonic() + 60
        while not await conn.fetchval("SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", PGQ_APP):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("pgqueuer worker did not start")
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.5)  # as for agentd: started, listening, idle
        log_start = log_file.stat().st_size if log_file else 0
        before, x0 = await table_stats(conn), await xacts(conn)
        await checkpoint(conn)
        cpu0 = (cpu_seconds([proc.pid]), cpu_seconds(postgres_pids()))
        q = Queries.from_asyncpg_connection(conn)
        async with conn.transaction():
            await q.enqueue(["noop"] * n, [p.encode() for p in payloads], [0] * n)
            mine = await table_stats(conn, "pg_stat_xact_user_tables")
            lsn0 = await wal_position(conn)
        t0 = await conn.fetchval("SELECT clock_timestamp()")
        deadline = time.monotonic() + 300
        while await conn.fetchval("SELECT count(*) FROM pgqueuer_log WHERE status = 'successful'") < n:
            if time.monotonic() > deadline:
                raise RuntimeError("pgqueuer drain did not finish")
            await asyncio.sleep(0.05)
        wal, lsn1 = await wal_since(conn, lsn0), await wal_position(conn)
        cpu1 = (cpu_seconds([proc.pid]), cpu_seconds(postgres_pids()))
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    first, last = await conn.fetchrow(
        "SELECT min(created), max(created) FROM pgqueuer_log WHERE status = 'successful'")
    left = await conn.fetchval("SELECT count(*) FROM pgqueuer")
    await conn.close()
    await asyncio.sleep(1.0)
    conn = await asyncpg.connect(dsn)
    after, x1 = await table_stats(conn), await xacts(conn)
    await conn.close()
    out = {"seconds": (last - t0).total_seconds(), "first_to_last": (last - first).total_seconds(), "left": left,
           "tuples": stats_delta(before, after, mine), "xacts": x1 - x0, "wal_bytes": wal, "wal_range": (lsn0, lsn1),
           "agent_cpu": cpu1[0] - cpu0[0], "postgres_cpu": cpu1[1] - cpu0[1]}
    if log_file:
        out["statements"] = statement_times(log_file, log_start, PGQ_APP)
    return out


async def pgq_wake(admin_dsn: str, samples: int) -> dict[str, float]:
    """enqueue -> job start, in-process (one clock), isolated jobs 0.3 s apart."""
    from pgqueuer import Queries, QueueManager

    dsn = await pgq_db(admin_dsn, "bench_peer_pgq_wake")
    wconn = await asyncpg.connect(dsn, server_settings={"application_name": PGQ_APP})
    qm = QueueManager(Queries.from_asyncpg_connection(wconn))
    seen: dict[str, float] = {}

    @qm.entrypoint("noop")
    async def noop(job) -> None:  # type: ignore[no-untyped-def]
        seen.setdefault(job.payload.decode(), time.perf_counter())

    task = asyncio.create_task(qm.run())
    await asyncio.sleep(2)
    conn = await asyncpg.connect(dsn)
    q = Queries.from_asyncpg_connection(conn)
    await q.enqueue("noop", b"warm-up")  # not counted, as in the agent's wake run
    await wait_for_key(seen, "warm-up")
    await asyncio.sleep(0.3)
    sent: dict[str, float] = {}
    for i in range(samples):
        key = f"s{i}"
        sent[key] = time.perf_counter()
        await q.enqueue("noop", key.encode())
        await asyncio.sleep(0.3)
    await asyncio.sleep(0.5)
    qm.shutdown.set()
    await asyncio.wait_for(task, 30)
    await conn.close()
    await wconn.close()
    return summarize([(seen[k] - t) * 1000 for k, t in sent.items() if k in seen], samples)


# -- statement counting ----------------------------------------------------------------------------

def statement_times(log_file: Path, start: int, app_prefix: str) -> dict[str, tuple[int, float]]:
    """Statements by their first 70 characters: how many, and the server's time on them in ms (the
    execute phase, from log_min_duration_statement = 0; 0 where only log_statement logged them)."""
    with log_file.open() as f:
        f.seek(start)
        window = f.read()
    found = re.findall(r"app=([^\n]*?) LOG:  (?:duration: ([\d.]+) ms  )?(?:statement|execute [^:]*): "
                       r"(.*?)(?=\n\d{4}-\d\d-\d\d |\Z)", window, re.S)
    kinds: dict[str, tuple[int, float]] = {}
    for app, ms, text in found:
        if app.startswith(app_prefix):
            key = " ".join(text.split())[:70]
            k, t = kinds.get(key, (0, 0.0))
            kinds[key] = (k + 1, t + float(ms or 0))
    return kinds


async def log_all(admin_dsn: str, on: bool) -> None:
    admin = await asyncpg.connect(admin_dsn)
    if on:  # every statement with its duration (log_statement = 'all' would log each a second time)
        await admin.execute("ALTER SYSTEM SET log_min_duration_statement = 0")
        await admin.execute("ALTER SYSTEM SET log_line_prefix = '%m [%p] app=%a '")
    else:
        await admin.execute("ALTER SYSTEM RESET log_min_duration_statement")
        await admin.execute("ALTER SYSTEM RESET log_line_prefix")
    await admin.execute("SELECT pg_reload_conf()")
    await admin.close()
    await asyncio.sleep(0.5)


async def agent_drain(admin_dsn: str, payloads: list[str], devices: int, log_file: Path | None = None) -> dict:
    r = await burst.drain(admin_dsn, "bench_peer_agent", [(f"d{i:03}", {}) for i in range(devices)], payloads,
                          log_file=log_file)
    if log_file:  # from the send on: start-up statements are not counted
        r["statements"] = statement_times(log_file, r["log_start"], "agentd")
        if keep := os.environ.get("BENCH_KEEP_LOG"):  # the drain's statement log, to read its timeline
            shutil.copy(log_file, keep)
    return r


def wal_stats(lsns: tuple[str, str], n: int, top: int = 12) -> str:
    """What the drain's WAL holds, by record type (pg_waldump --stats=record over its LSN range)."""
    assert burst.PG_DATA is not None
    waldump = Path(shutil.which("pg_waldump") or "")
    import pgserver

    for cand in Path(pgserver.__file__).parent.glob("pginstall/bin/pg_waldump"):
        waldump = cand
    out = subprocess.run([str(waldump), "-p", str(burst.PG_DATA / "pg_wal"), "--stats=record",
                          "-s", lsns[0], "-e", lsns[1]], capture_output=True, text=True)
    rows = []
    for line in out.stdout.splitlines():
        # Type  N (%)  Record size (%)  FPI size (%)  Combined size (%)
        nums = re.findall(r"(\d+) \(\s*[\d.]+\)", line)
        if len(nums) == 4 and "/" in line.split()[0]:
            rows.append((line.split()[0], *map(int, nums)))
    if not rows:
        return f"pg_waldump gave nothing ({out.stderr.strip()[:200]})"
    total = sum(r[4] for r in rows)
    lines = [f"{sum(r[1] for r in rows) / n:.2f} records, {sum(r[2] for r in rows) / n:,.0f} record bytes, "
             f"{sum(r[3] for r in rows) / n:,.0f} full-page-image bytes per command (total {total / n:,.0f}):"]
    for name, k, rec, fpi, _ in sorted(rows, key=lambda r: -r[4])[:top]:
        lines.append(f"  {name:32} {k / n:6.2f} records {rec / n:7,.0f} B  FPI {fpi / n:7,.0f} B  per command")
    return "\n".join(lines)


def print_statements(label: str, kinds: dict[str, tuple[int, float]], n: int) -> None:
    total = sum(k for k, _ in kinds.values())
    ms = sum(t for _, t in kinds.values())
    print(f"statements {label}: {total} for {n} = {total / n:.3f} per command; server time executing them "
          f"{ms:,.0f} ms = {ms * 1000 / n:.0f} µs per command (log_min_duration_statement = 0)")
    for text, (k, t) in sorted(kinds.items(), key=lambda kv: -kv[1][1])[:12]:
        print(f"  {k:6} x {t:8,.0f} ms  {text}")


# -- main ------------------------------------------------------------------------------------------

async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=2, help="side-by-side drain runs (median reported)")
    ap.add_argument("--devices", type=int, default=200)
    ap.add_argument("--services", type=int, default=100)
    ap.add_argument("--wake-samples", type=int, default=200)
    ap.add_argument("--wake-rounds", type=int, default=2)
    ap.add_argument("--idle-seconds", type=float, default=60, help="0 skips the idle measurement")
    ap.add_argument("--no-statements", action="store_true")
    ap.add_argument("--wal-stats", action="store_true", help="pg_waldump --stats of each side's drain (last run)")
    ap.add_argument("--pgq-batch", type=int, default=100,
                    help="also drain with pgqueuer run(batch_size=N), matched to AGENT_BATCH_SIZE (0: skip)")
    ap.add_argument("--pgq-uvloop", action="store_true",
                    help="run the pgqueuer worker on uvloop, as its own CLI does (agentd runs on asyncio's loop)")
    ap.add_argument("--pgq-gc", action="store_true",
                    help="set the pgqueuer worker's garbage collector as agentd sets its own (pgqueuer does not)")
    ap.add_argument("--pgq-worker", nargs="+", metavar="DSN JOBS [BATCH]", help=argparse.SUPPRESS)
    args = ap.parse_args()
    global PGQ_UVLOOP, PGQ_GC
    PGQ_UVLOOP, PGQ_GC = args.pgq_uvloop, args.pgq_gc
    if args.pgq_worker:
        await pgq_worker(args.pgq_worker[0], int(args.pgq_worker[1]),
                         int(args.pgq_worker[2]) if len(args.pgq_worker) > 2 else None)
        return
    import pgqueuer
    import pgserver

    root = Path(tempfile.mkdtemp(prefix="agent-peers-"))
    os.chmod(root, 0o755)
    server = pgserver.get_server(root / "pg", cleanup_mode="delete")
    burst.PG_DATA = root / "pg"
    log_file = root / "pg" / "log"
    try:
        admin = server.get_uri()
        conn = await asyncpg.connect(admin)
        pg_version = await conn.fetchval("SHOW server_version")
        await conn.close()
        print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
        print(f"date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; git {git_rev()}; "
              f"pgqueuer {pgqueuer.__version__}")
        print(f"machine: {machine(pg_version)}")
        print("agentd: default settings (AGENT_CONCURRENCY 32, AGENT_COALESCE 100, AGENT_BATCH_SIZE 100, "
              "AGENT_PREFETCH 1000), log level WARNING; pgqueuer: QueueManager.run() defaults (batch_size 10), "
              "durable schema, event loop " + ("uvloop (as `pgq run`)" if PGQ_UVLOOP else "asyncio's (as agentd)")
              + ("; its garbage collector set as agentd's" if PGQ_GC else ""))
        payloads = bodies(args.devices, args.services)
        n = len(payloads)
        ratios, arates, prates, a_res, p_res = [], [], [], [], []
        trates, tratios, t_res = [], [], []
        for run in range(1, args.runs + 1):
            sides = ["agent", "pgq"] if run % 2 else ["pgq", "agent"]
            if args.pgq_batch:
                sides.insert(1, "pgq_tuned")
            got = {}
            for side in sides:
                if side == "agent":
                    got[side] = await agent_drain(admin, payloads, args.devices)
                elif side == "pgq":
                    got[side] = await pgq_drain(admin, payloads)
                else:
                    got[side] = await pgq_drain(admin, payloads, batch_size=args.pgq_batch)
                if args.wal_stats:  # now: the next side's checkpoint may recycle this drain's WAL
                    got[side]["wal_stats"] = wal_stats(got[side]["wal_range"], n)
            a, p = got["agent"], got["pgq"]
            ar, pr = n / a["seconds"], n / p["seconds"]
            arates.append(ar)
            prates.append(pr)
            ratios.append(ar / pr)
            a_res.append(a)
            p_res.append(p)
            print(f"drain run {run} ({' then '.join(sides)}): agentd {n} commands over {args.devices} devices in "
                  f"{a['seconds']:.2f} s = {ar:,.0f}/s (first to last archive {a['first_to_last']:.2f} s); "
                  f"{summary(a)}")
            print(f"drain run {run}: pgqueuer {n} no-op jobs in {p['seconds']:.2f} s = {pr:,.0f}/s (first to last "
                  f"completion {p['first_to_last']:.2f} s); {p['left']} left; CPU worker {p['agent_cpu']:.1f} s, "
                  f"postgres {p['postgres_cpu']:.1f} s; ratio agent/pgqueuer {ar / pr:.2f}")
            if "pgq_tuned" in got:
                t = got["pgq_tuned"]
                tr = n / t["seconds"]
                trates.append(tr)
                tratios.append(ar / tr)
                t_res.append(t)
                print(f"drain run {run}: pgqueuer run(batch_size={args.pgq_batch}) {n} no-op jobs in "
                      f"{t['seconds']:.2f} s = {tr:,.0f}/s (first to last completion {t['first_to_last']:.2f} s); "
                      f"{t['left']} left; CPU worker {t['agent_cpu']:.1f} s, postgres {t['postgres_cpu']:.1f} s; "
                      f"ratio agent/pgqueuer(batch {args.pgq_batch}) {ar / tr:.2f}")
        ratio = statistics.median(ratios)
        print(f"drain: agentd median {statistics.median(arates):,.0f}/s, pgqueuer median "
              f"{statistics.median(prates):,.0f}/s; ratio median {ratio:.2f} over {args.runs} runs "
              f"({', '.join(f'{x:.2f}' for x in ratios)}) [target >= 1.0: {verdict(ratio >= 1.0)}]")
        if tratios:
            tratio = statistics.median(tratios)
            print(f"drain vs pgqueuer run(batch_size={args.pgq_batch}): pgqueuer median "
                  f"{statistics.median(trates):,.0f}/s; ratio median {tratio:.2f} "
                  f"({', '.join(f'{x:.2f}' for x in tratios)}) [target >= 1.0: {verdict(tratio >= 1.0)}]")
        last = {"agentd": a_res[-1], "pgqueuer": p_res[-1], **({"tuned": t_res[-1]} if t_res else {})}
        for label, res in last.items():
            print(f"rows {label}: {per_command(res['tuples'], n)}; {res['xacts'] / n:.3f} transactions per "
                  f"command (database-wide, the bench's polling included); WAL {res['wal_bytes'] / n:,.0f} bytes "
                  f"per command ({res['wal_bytes'] / 1e6:.1f} MB, cluster-wide, from the send's commit to the "
                  f"drain's end; a checkpoint before each drain)")
            if "wal_stats" in res:
                print(f"wal stats {label}: {res['wal_stats']}")
        stmts: dict[str, float] = {}
        if not args.no_statements:
            await log_all(admin, True)
            try:
                a = await agent_drain(admin, payloads, args.devices, log_file)
                p = await pgq_drain(admin, payloads, log_file)
                t = await pgq_drain(admin, payloads, log_file, batch_size=args.pgq_batch) if args.pgq_batch else None
            finally:
                await log_all(admin, False)
            print(f"statement-count drains (log_min_duration_statement = 0, slower): agentd {a['seconds']:.2f} s, "
                  f"pgqueuer {p['seconds']:.2f} s" + (f", pgqueuer batch {args.pgq_batch} {t['seconds']:.2f} s"
                                                      if t else ""))
            for label, res in (("agentd", a), ("pgqueuer", p), *([("tuned", t)] if t else [])):
                print_statements(label, res["statements"], n)
                stmts[label] = sum(k for k, _ in res["statements"].values()) / n
        print(f"per verified command (agentd) / per job (pgqueuer), drain run {args.runs}:")
        print(f"  {'':28} {'drains/s':>9} {'rows':>6} {'xacts':>7} {'WAL bytes':>10} {'statements':>10}")
        names = {"agentd": "agentd (defaults)", "pgqueuer": "pgqueuer batch_size 10",
                 "tuned": f"pgqueuer batch_size {args.pgq_batch}"}
        for label, res in last.items():
            rows = sum(sum(v) for v in res["tuples"].values()) / n
            st = f"{stmts[label]:.3f}" if label in stmts else "-"
            print(f"  {names[label]:28} {n / res['seconds']:>9,.0f} {rows:>6.2f} {res['xacts'] / n:>7.3f} "
                  f"{res['wal_bytes'] / n:>10,.0f} {st:>10}")
        ap50, ap99, pp50, pp99 = [], [], [], []
        for rnd in range(1, args.wake_rounds + 1):
            aw = await wake_latency(admin, args.wake_samples)
            pw = await pgq_wake(admin, args.wake_samples)
            ap50.append(aw["p50"])
            ap99.append(aw["p99"])
            pp50.append(pw["p50"])
            pp99.append(pw["p99"])
            print(f"wake round {rnd}, {args.wake_samples} isolated messages each: agent send -> first device call "
                  f"p50 {aw['p50']:.2f} ms, p99 {aw['p99']:.2f} ms, max {aw['max']:.2f}, missing {aw['missing']}; "
                  f"pgqueuer enqueue -> job start p50 {pw['p50']:.2f} ms, p99 {pw['p99']:.2f} ms, max "
                  f"{pw['max']:.2f}, missing {pw['missing']}")
        if ap50:
            a50, a99, p50 = statistics.median(ap50), statistics.median(ap99), statistics.median(pp50)
            print(f"wake: agent p50 {a50:.2f} ms vs pgqueuer p50 {p50:.2f} ms "
                  f"[agent <= pgqueuer: {verdict(a50 <= p50)}]; agent p99 {a99:.2f} ms [<= 20: {verdict(a99 <= 20)}]; "
                  f"pgqueuer p99 {statistics.median(pp99):.2f} ms (medians of {args.wake_rounds} rounds)")
        if args.idle_seconds > 0:
            idle = await idle_statements(admin, log_file, args.idle_seconds)
            print(f"idle (default settings): {idle['count']} statements in {args.idle_seconds:.0f} s = "
                  f"{idle['per_min']:.1f}/min [<= 12: {verdict(idle['per_min'] <= 12)}] "
                  "(server log, log_statement=all)")
            for text, k in sorted(idle["kinds"].items(), key=lambda kv: -kv[1]):
                print(f"  {k:3} x {text}")
    finally:
        server.cleanup()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    if "--pgq-worker" in sys.argv and "--pgq-uvloop" in sys.argv:
        import uvloop  # installed with pgqueuer (a dependency of it)

        uvloop.run(main())
    else:
        asyncio.run(main())
