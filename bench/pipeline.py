"""Pipeline benchmark: prints throughput, wake latency and idle statement rate in one run.

    .venv/bin/python bench/pipeline.py [--tasks 20000] [--devices 200] [--wake-samples 100] [--idle-seconds 60]

Uses its own throwaway Postgres (pgserver, Unix socket) and the real agentd as a subprocess for
throughput and idle load; wake latency is measured in-process with a recording driver, so the
clock of `pgmq.send` and of the driver call is the same. Prints PASS/MISS against the targets.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.db.schema import init_database
from agent.drivers.base import DriverContext
from agent.drivers.registry import Drivers
from agent.model.device import Device
from agent.runtime.daemon import Agent, connect_pool
from agent.settings import load_settings

TARGETS = {"tasks_per_s": 10_000, "wake_p50_ms": 5.0, "wake_p99_ms": 20.0, "idle_per_min": 12}


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


async def fresh_db(admin_dsn: str, name: str) -> str:
    conn = await asyncpg.connect(admin_dsn)
    await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    await conn.execute(f'CREATE DATABASE "{name}"')
    await conn.close()
    dsn = admin_dsn.replace("/postgres?", f"/{name}?")
    conn = await asyncpg.connect(dsn)
    await init_database(conn, "device_tasks")
    await conn.close()
    return dsn


def agentd(dsn: str, **env: str) -> subprocess.Popen[bytes]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("AGENT_")}
    # bursts of suspensions are what the benches drain: the guard against mass suspension is off
    full.update({"AGENT_DATABASE_URL": dsn, "AGENT_HTTP_LISTEN": "", "AGENT_LOG_LEVEL": "WARNING",
                 "AGENT_GUARD_OFF_PERCENT": "100", **env})
    # BENCH_AGENT_ENV="AGENT_X=1 AGENT_Y=2": settings over the bench's own (to compare a setting's effect)
    full.update(item.split("=", 1) for item in os.environ.get("BENCH_AGENT_ENV", "").split() if "=" in item)
    # BENCH_CPROFILE=<file>: agentd under cProfile (its own overhead distorts times; counts are exact)
    prof = ["-m", "cProfile", "-o", os.environ["BENCH_CPROFILE"]] if os.environ.get("BENCH_CPROFILE") else []
    proc = subprocess.Popen([sys.executable, *prof, "-m", "agent"], env=full)
    if spy := os.environ.get("BENCH_PYSPY"):  # a py-spy binary: agentd's profile, raw, to BENCH_PYSPY_OUT
        # (BENCH_PYSPY_RATE samples a second, 250 by default)
        rate = os.environ.get("BENCH_PYSPY_RATE", "250")
        subprocess.Popen([spy, "record", "-r", rate, "-f", "raw", "-o", os.environ["BENCH_PYSPY_OUT"],
                          "--pid", str(proc.pid)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


async def throughput(admin_dsn: str, tasks: int, devices: int, env: dict[str, str]) -> dict[str, float]:
    dsn = await fresh_db(admin_dsn, "bench_tp")
    conn = await asyncpg.connect(dsn)
    await conn.executemany("INSERT INTO agent.devices (id, driver) VALUES ($1, 'sim')",
                           [(f"d{i:03}",) for i in range(devices)])
    bodies = [json.dumps({"device": f"d{i % devices:03}", "service": "wifi",
                          "state": "on" if (i // devices) % 2 == 0 else "off"}) for i in range(tasks)]
    for start in range(0, tasks, 2000):
        await conn.execute("SELECT pgmq.send_batch('device_tasks', $1::jsonb[])", bodies[start:start + 2000])
    proc = agentd(dsn, **env)
    try:
        deadline = time.monotonic() + 300
        cpu_before = None
        while (n := await conn.fetchval('SELECT count(*) FROM pgmq."a_device_tasks"')) < tasks:
            if cpu_before is None and n > 0:
                cpu_before = (cpu_seconds([proc.pid]), cpu_seconds(postgres_pids()))
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("throughput run did not finish")
            await asyncio.sleep(0.05)
        cpu_after = (cpu_seconds([proc.pid]), cpu_seconds(postgres_pids()))
    finally:
        stop(proc)
    first, last = await conn.fetchrow('SELECT min(archived_at), max(archived_at) FROM pgmq."a_device_tasks"')
    wrong = await conn.fetchval("SELECT count(*) FROM agent.service_state WHERE observed <> $1 OR desired <> $1",
                                "on" if ((tasks - 1) // devices) % 2 == 0 else "off")
    left = await conn.fetchval('SELECT count(*) FROM pgmq."q_device_tasks"')
    dlq = await conn.fetchval('SELECT count(*) FROM pgmq."q_device_tasks_dlq"')
    verified = await conn.fetchval("SELECT count(*) FROM agent.events WHERE kind = 'verified'")
    await conn.close()
    seconds = (last - first).total_seconds()
    cpu = [a - b for a, b in zip(cpu_after, cpu_before or (0.0, 0.0))]
    return {"seconds": seconds, "tasks_per_s": tasks / seconds, "wrong_states": wrong, "left": left,
            "dlq": dlq, "verified_events": verified, "agent_cpu": cpu[0], "postgres_cpu": cpu[1]}


def cpu_seconds(pids: list[int]) -> float:
    """user + system CPU time of these processes, from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


def postgres_pids() -> list[int]:
    out = subprocess.run(["pgrep", "-x", "postgres"], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


class Recorder:
    """A zero-latency device that notes when each command first reaches it."""

    name = "bench"

    def __init__(self) -> None:
        self.seen: dict[str, float] = {}
        self.states: dict[str, str] = {}

    def __call__(self, _ctx: object = None) -> Recorder:
        return self

    def validate_options(self, device: Device) -> None:
        pass

    async def read(self, device: Device, service: str) -> str:
        self.seen.setdefault(service, time.perf_counter())
        return self.states.get(service, "off")

    async def apply(self, device: Device, service: str, state: str) -> None:
        self.states[service] = state

    async def probe(self, device: Device) -> None:
        pass

    async def close(self) -> None:
        pass


async def wake_latency(admin_dsn: str, samples: int) -> dict[str, float]:
    dsn = await fresh_db(admin_dsn, "bench_wake")
    conn = await asyncpg.connect(dsn)
    await conn.execute("INSERT INTO agent.devices (id, driver) VALUES ('w1', 'bench')")
    # isolated commands and nothing else: no scheduled reconcile crossing the run (the recording
    # device reads one service at a time, so a run would hold the lane for a pace per service)
    # and no guard against mass suspension: half the commands are offs of distinct services
    settings = load_settings(None, database_url=dsn, http_listen="", poll_interval=60, log_level="WARNING",
                             reconcile_schedule="off", guard_off_percent=100)
    rec = Recorder()
    pool = await connect_pool(settings, attempts=1)
    agent = Agent(settings, pool, Drivers(DriverContext(), {"bench": rec}))
    await agent.start()
    stop_ev = asyncio.Event()
    task = asyncio.create_task(agent.run_forever(stop_ev))
    await asyncio.wait_for(agent.session.connected.wait(), 10)
    await asyncio.sleep(1)
    sent: dict[str, float] = {}
    send = await conn.prepare("SELECT pgmq.send('device_tasks', $1::jsonb)")
    # one message first, not counted: its statements are prepared on first use, in either peer
    await send.fetchval(json.dumps({"device": "w1", "service": "warm-up", "state": "on"}))
    await wait_for_key(rec.seen, "warm-up")
    await asyncio.sleep(0.3)  # past the notify throttle, like every message after it
    for i in range(samples):
        service = f"s{i}"
        body = json.dumps({"device": "w1", "service": service, "state": "on"})
        sent[service] = time.perf_counter()
        await send.fetchval(body)
        await asyncio.sleep(0.3)  # past the 250 ms notify throttle: every message is isolated
    await asyncio.sleep(0.5)
    stop_ev.set()
    await task
    await pool.close()
    await conn.close()
    return summarize([(rec.seen[s] - t) * 1000 for s, t in sent.items() if s in rec.seen], samples)


async def wait_for_key(seen: dict[str, float], key: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while key not in seen:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the warm-up message {key!r} never arrived")
        await asyncio.sleep(0.01)


def summarize(latencies_ms: list[float], samples: int) -> dict[str, float]:
    """p50 and p99 by nearest rank (of 100 samples, p99 is the 99th: the worst one is left out)."""
    lat = sorted(latencies_ms)
    p99 = lat[max(0, math.ceil(0.99 * len(lat)) - 1)]
    return {"n": len(lat), "p50": statistics.median(lat), "p99": p99, "max": lat[-1], "missing": samples - len(lat)}


async def idle_statements(admin_dsn: str, log_file: Path, seconds: float) -> dict[str, float]:
    dsn = await fresh_db(admin_dsn, "bench_idle")
    admin = await asyncpg.connect(admin_dsn)
    await admin.execute("ALTER SYSTEM SET log_statement = 'all'")
    await admin.execute("ALTER SYSTEM SET log_line_prefix = '%m [%p] app=%a '")
    await admin.execute("SELECT pg_reload_conf()")
    proc = agentd(dsn)
    try:
        await asyncio.sleep(10)  # start-up done
        start_size = log_file.stat().st_size
        await asyncio.sleep(seconds)
        with log_file.open() as f:
            f.seek(start_size)
            window = f.read()
    finally:
        stop(proc)
        await admin.execute("ALTER SYSTEM RESET log_statement")
        await admin.execute("ALTER SYSTEM RESET log_line_prefix")
        await admin.execute("SELECT pg_reload_conf()")
        await admin.close()
    if os.environ.get("BENCH_DUMP_LOG"):
        Path(os.environ["BENCH_DUMP_LOG"]).write_text(window)
    statements = re.findall(r"app=(agentd[^\n]*?) LOG:  (?:statement|execute [^:]*): (.*)", window)
    kinds: dict[str, int] = {}
    for _app, text in statements:
        key = " ".join(text.split())[:60]
        kinds[key] = kinds.get(key, 0) + 1
    return {"per_min": len(statements) * 60 / seconds, "count": len(statements), "kinds": kinds}


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", type=int, default=20_000)
    ap.add_argument("--devices", type=int, default=200)
    ap.add_argument("--wake-samples", type=int, default=100)
    ap.add_argument("--idle-seconds", type=float, default=60)
    ap.add_argument("--runs", type=int, default=3, help="throughput runs (median reported)")
    ap.add_argument("--concurrency", default="200")
    ap.add_argument("--batch-size", default="200")
    ap.add_argument("--prefetch", default="2000")
    args = ap.parse_args()
    import pgserver

    root = Path(tempfile.mkdtemp(prefix="agent-bench-"))
    os.chmod(root, 0o755)
    server = pgserver.get_server(root / "pg", cleanup_mode="delete")
    try:
        admin = server.get_uri()
        conn = await asyncpg.connect(admin)
        pg_version = await conn.fetchval("SHOW server_version")
        await conn.close()
        print(f"machine: {os.cpu_count()} cores, {platform.python_implementation()} {platform.python_version()}, "
              f"PostgreSQL {pg_version} (pgserver, Unix socket)")
        env = {"AGENT_CONCURRENCY": args.concurrency, "AGENT_BATCH_SIZE": args.batch_size,
               "AGENT_PREFETCH": args.prefetch}
        print(f"throughput settings: {env}, log level WARNING")
        rates = []
        for run in range(1, args.runs + 1):
            tp = await throughput(admin, args.tasks, args.devices, env)
            rates.append(tp["tasks_per_s"])
            print(f"throughput run {run}: {args.tasks} tasks over {args.devices} devices (sim, latency 0; read, "
                  f"apply, verify, report, archive) in {tp['seconds']:.2f} s = {tp['tasks_per_s']:,.0f} tasks/s; "
                  f"{tp['verified_events']} verified, {tp['wrong_states']} wrong final states, {tp['left']} left, "
                  f"{tp['dlq']} in DLQ; CPU agentd {tp['agent_cpu']:.2f} s, postgres {tp['postgres_cpu']:.2f} s")
        best, median = max(rates), statistics.median(rates)
        print(f"throughput: median {median:,.0f} tasks/s, best {best:,.0f}, worst {min(rates):,.0f} over "
              f"{args.runs} runs [target >= {TARGETS['tasks_per_s']:,}: {verdict(median >= TARGETS['tasks_per_s'])}]")
        wl = await wake_latency(admin, args.wake_samples)
        print(f"wake latency pgmq.send -> driver call, {wl['n']} isolated messages: p50 {wl['p50']:.2f} ms "
              f"[<= 5: {verdict(wl['p50'] <= 5)}], p99 {wl['p99']:.2f} ms [<= 20: {verdict(wl['p99'] <= 20)}], "
              f"max {wl['max']:.2f} ms, missing {wl['missing']}")
        idle = await idle_statements(admin, root / "pg" / "log", args.idle_seconds)
        print(f"idle: {idle['count']} statements in {args.idle_seconds:.0f} s = {idle['per_min']:.1f}/min "
              f"[<= 12: {verdict(idle['per_min'] <= 12)}] (counted in the server log, log_statement=all)")
        for text, n in sorted(idle["kinds"].items(), key=lambda kv: -kv[1]):
            print(f"  {n:3} x {text}")
    finally:
        server.cleanup()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
