"""Many sites on one Postgres: N agents, each for its own site, queue, LOGIN role and sim devices.

    .venv/bin/python bench/sites.py --agents 200 [--devices-per-site 4] [--idle-seconds 300]
        [--load-seconds 120] [--rate 5] [--pool-size 1] [--per-process 50] [--dsn URL]

The agents run in-process, --per-process of them in one event loop in each worker process (this
script again, with --worker), each an `agent.runtime.daemon.Agent` built from its own Settings, as agentd
builds it. Each site logs in as its own role (member of agent_worker), so pg_stat_activity and the
statement counts say which agent a backend or a statement belongs to. Phases:
  start   agents started, all registered (agent.agents) and every site led; then 15 s to settle.
  idle    --idle-seconds with no commands: backends held (pg_stat_activity, sampled every 2 s, per
          agent and by application_name with the agent's id masked), statements per agent per minute
          (pg_stat_statements when the server preloads it, else the server log with log_statement=all
          on a cluster this script started, else pg_stat_database transactions, total only), CPU.
  load    --rate commands a second in total for --load-seconds, round robin over the sites in a
          shuffled order, a random device of the site and a distinct customer each; enqueue (the
          database clock after pgmq.send) -> the 'verified' event (its timestamp): p50/p95/p99.
Throughout, the holder of each site's leader lock is sampled every 2 s (elections per site), and the
agents' own log records count leader_elected / leader_lost. Reconcile runs are off and the leader's
retention pass runs at election and then hourly, so neither falls in the idle window.
Targets (issue 14, N = 200): backends <= 2 per agent, idle <= 12 statements per agent per minute,
no site starved, one election per site. To measure another commit than the working tree:
`git archive REV | tar -x -C DIR`, put this bench/ in DIR, `echo REV > DIR/REVISION`, run DIR/bench/sites.py.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import logging
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter, defaultdict
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent))

import burst
from burst import git_rev, machine, rss_mb, xacts
from common import StatementLog, has_pg_stat_statements, private_cluster, private_kb, statement_calls, with_user
from pipeline import cpu_seconds, verdict

from agent.db.leadership import LEADER_LOCK_CLASS
from agent.db.schema import init_database
from agent.runtime.daemon import Agent, connect_pool
from agent.settings import load_settings

DB = "bench_sites"
ROLE_PREFIX = "agent_s"
SAMPLE = 2.0
TARGET_BACKENDS, TARGET_IDLE = 2, 12


def site(i: int) -> str:
    return f"s{i:04}"


def role(s: str) -> str:
    return f"agent_{s}"


def fixed_settings(pool_size: int) -> dict[str, object]:
    """What differs from agentd's defaults, for every agent."""
    return {"http_listen": "", "pool_size": pool_size, "reconcile_schedule": "off", "prune_interval": 3600}


def agent_settings(dsn: str, s: str, pool_size: int) -> dict[str, object]:
    return {"database_url": with_user(dsn, role(s)), "site": s, "queue": f"tasks_{s}", "agent_id": f"sim-{s}",
            **fixed_settings(pool_size)}


# -- worker: many agents in one event loop ---------------------------------------------------------

class Tally(logging.Handler):
    """Counts the agents' log records by action, and leader records by site."""

    def __init__(self, sites: set[str]) -> None:
        super().__init__(logging.INFO)
        self.sites = sites
        self.actions: Counter[str] = Counter()
        self.leader: dict[str, Counter[str]] = defaultdict(Counter)

    def emit(self, record: logging.LogRecord) -> None:
        action = getattr(record, "action", None)
        if not action:
            return
        self.actions[action] += 1
        if action.startswith("leader_"):
            args = record.args if isinstance(record.args, tuple) else ()
            where = next((a for a in args if isinstance(a, str) and a in self.sites), "?")
            self.leader[action][where] += 1


async def run_agent(options: dict[str, object], stop: asyncio.Event, failed: list[str]) -> None:
    settings = load_settings(None, **options)
    try:
        pool = await connect_pool(settings, attempts=5)
        agent = Agent(settings, pool)
        await agent.start()
    except Exception as exc:  # reported, the others run on
        failed.append(f"{settings.site}: {exc!r}")
        return
    try:
        await agent.run_forever(stop)
    except Exception as exc:
        failed.append(f"{settings.site}: {exc!r}")
    finally:
        await agent.drivers.close()
        await pool.close()


async def worker(spec: dict) -> None:
    tally = Tally(set(spec["sites"]))
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger().setLevel(logging.INFO)
    logging.getLogger().handlers[0].setLevel(logging.WARNING)
    logging.getLogger().addHandler(tally)
    stop, failed = asyncio.Event(), []
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    tasks = []
    for s in spec["sites"]:  # started a little apart, as a fleet would be
        tasks.append(asyncio.create_task(run_agent(agent_settings(spec["dsn"], s, spec["pool_size"]), stop, failed)))
        await asyncio.sleep(0.05)
    await asyncio.gather(*tasks)
    print(json.dumps({"actions": tally.actions, "leader": tally.leader, "failed": failed}), flush=True)


def spawn(dsn: str, sites: list[str], pool_size: int, log: Path) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENT_")}
    spec = json.dumps({"dsn": dsn, "sites": sites, "pool_size": pool_size})
    return subprocess.Popen([sys.executable, __file__, "--worker", spec], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=log.open("a"))


# -- the database ----------------------------------------------------------------------------------

def database_dsn(admin_dsn: str, name: str) -> str:
    parts = urlsplit(admin_dsn)
    return urlunsplit(parts._replace(path=f"/{name}"))


async def prepare(admin_dsn: str, sites: list[str], devices: int, latency: float) -> str:
    """A fresh database, each site's queue (agentctl db init), LOGIN role and sim devices."""
    admin = await asyncpg.connect(admin_dsn)
    await admin.execute(f'DROP DATABASE IF EXISTS "{DB}" WITH (FORCE)')
    await admin.execute(f'CREATE DATABASE "{DB}"')
    for s in sites:
        if not await admin.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", role(s)):
            await admin.execute(f'CREATE ROLE "{role(s)}" LOGIN')
    await admin.close()
    dsn = database_dsn(admin_dsn, DB)
    conn = await asyncpg.connect(dsn)
    recorded = "site" in inspect.signature(init_database).parameters  # agent.sites (0007) and later
    for s in sites:
        await init_database(conn, f"tasks_{s}", **({"site": s} if recorded else {}))
    for s in sites:
        await conn.execute(f'GRANT agent_worker TO "{role(s)}"')
    await conn.executemany("INSERT INTO agent.devices (id, driver, site, options) VALUES ($1, 'sim', $2, $3::jsonb)",
                           [(f"{s}-r{d}", s, json.dumps({"latency": latency})) for s in sites for d in range(devices)])
    await conn.close()
    return dsn


class Watch:
    """Samples backends by agent and by name, and each site's leader, every SAMPLE seconds."""

    def __init__(self, conn: asyncpg.Connection, sites: list[str]) -> None:
        self.conn, self.sites = conn, sites
        self.queries = 0
        self.phase = "start"
        self.peak: dict[str, Counter[str]] = defaultdict(Counter)      # phase -> role -> most backends
        self.names: dict[str, Counter[str]] = defaultdict(Counter)     # phase -> name -> most backends
        self.total: Counter[str] = Counter()                           # phase -> most backends in all
        self.last: dict[str, Counter[str]] = defaultdict(Counter)      # phase -> role -> backends, last sample
        self.holders: dict[str, list[int | None]] = {s: [] for s in sites}
        self.backend_pids: set[int] = set()

    async def sample(self) -> None:
        rows = await self.conn.fetch(
            "SELECT pid, usename, application_name FROM pg_stat_activity WHERE usename LIKE $1", ROLE_PREFIX + "%")
        locks = dict(await self.conn.fetch(
            """SELECT a.usename, l.pid FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
               WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2 AND l.classid::bigint = $1""",
            LEADER_LOCK_CLASS))
        self.queries += 2
        per_role, per_name = Counter(r["usename"] for r in rows), Counter()
        for r in rows:
            per_name[r["application_name"].replace(f"sim-{r['usename'][len('agent_'):]}", "<id>")] += 1
        self.backend_pids = {r["pid"] for r in rows}
        p = self.phase
        self.last[p] = per_role
        self.total[p] = max(self.total[p], len(rows))
        for key, n in per_role.items():
            self.peak[p][key] = max(self.peak[p][key], n)
        for key, n in per_name.items():
            self.names[p][key] = max(self.names[p][key], n)
        for s in self.sites:
            pid = locks.get(role(s))
            if not self.holders[s] or self.holders[s][-1] != pid:
                self.holders[s].append(pid)

    async def run(self) -> None:
        while True:
            await self.sample()
            await asyncio.sleep(SAMPLE)

    def elections(self, s: str) -> int:
        return sum(1 for pid in self.holders[s] if pid is not None)

    def led(self) -> int:
        return sum(1 for s in self.sites if self.holders[s] and self.holders[s][-1] is not None)


async def wait_ready(conn: asyncpg.Connection, watch: Watch, procs: list[subprocess.Popen[str]], n: int) -> float:
    t0, deadline = time.monotonic(), time.monotonic() + 120 + n
    while True:
        agents = await conn.fetchval("SELECT count(*) FROM agent.agents WHERE agent_id LIKE 'sim-%'")
        if agents >= n and watch.led() >= n:
            return time.monotonic() - t0
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
            raise RuntimeError(f"not ready: {agents} of {n} agents registered, {watch.led()} sites led")
        await asyncio.sleep(1)


# -- phases ----------------------------------------------------------------------------------------

async def measure_idle(conn: asyncpg.Connection, watch: Watch, stmts: StatementLog | None, method: str,
                       seconds: float, procs: list[subprocess.Popen[str]]) -> dict:
    watch.phase = "idle"
    x0, q0 = await xacts(conn), watch.queries
    cpu0 = cpu_seconds([p.pid for p in procs]), cpu_seconds(burst.postgres_pids())
    calls0 = await statement_calls(conn) if method == "pg_stat_statements" else Counter()
    if stmts:
        await stmts.begin()
    await asyncio.sleep(seconds)
    if stmts:
        await stmts.end(keep=lambda user: user.startswith(ROLE_PREFIX))
        by_role = stmts.by_user
    elif method == "pg_stat_statements":
        by_role = await statement_calls(conn) - calls0
    else:
        by_role = Counter()
    cpu1 = cpu_seconds([p.pid for p in procs]), cpu_seconds(burst.postgres_pids())
    x1 = await xacts(conn)
    mem = [private_kb(pid) for pid in watch.backend_pids]
    return {"by_role": by_role, "texts": stmts.by_text if stmts else Counter(),
            "apps": stmts.by_app if stmts else Counter(),
            "xacts": x1 - x0 - (watch.queries - q0) - 2, "cpu_agents": cpu1[0] - cpu0[0],
            "cpu_postgres": cpu1[1] - cpu0[1], "backend_kb": mem, "rss": [rss_mb(p.pid) for p in procs]}


async def load(conn: asyncpg.Connection, sites: list[str], devices: int, rate: float,
               seconds: float) -> dict[tuple[str, int], tuple[str, datetime]]:
    """Commands at a steady rate, round robin over the sites in a shuffled order, distinct customers."""
    rng = random.Random(14)
    order = sites[:]
    rng.shuffle(order)
    send = await conn.prepare("SELECT pgmq.send($1::text, $2::jsonb) AS id, clock_timestamp() AS at")
    sent: dict[tuple[str, int], tuple[str, datetime]] = {}
    t0 = time.monotonic()
    for i in range(int(rate * seconds)):
        if (delay := t0 + i / rate - time.monotonic()) > 0:
            await asyncio.sleep(delay)
        s = order[i % len(order)]
        device = f"{s}-r{rng.randrange(devices)}"
        row = await send.fetchrow(f"tasks_{s}", json.dumps({"device": device, "service": f"pppoe:c{i:06}",
                                                             "state": "on"}))
        sent[(device, row["id"])] = (s, row["at"])
    return sent


async def verified(conn: asyncpg.Connection, sent: dict[tuple[str, int], tuple[str, datetime]],
                   timeout: float) -> dict[tuple[str, int], float]:
    """Seconds from enqueue to the command's 'verified' (or 'noop') event, for those that got one."""
    since = min(at for _s, at in sent.values())
    deadline = time.monotonic() + timeout
    while True:
        rows = await conn.fetch("""SELECT device, msg_id, min(at) AS at FROM agent.events
                                   WHERE kind IN ('verified', 'noop') AND at >= $1 GROUP BY 1, 2""", since)
        got = {(r["device"], r["msg_id"]): r["at"] for r in rows if (r["device"], r["msg_id"]) in sent}
        if len(got) >= len(sent) or time.monotonic() > deadline:
            return {k: (at - sent[k][1]).total_seconds() for k, at in got.items()}
        await asyncio.sleep(1)


def stop_workers(procs: list[subprocess.Popen[str]]) -> list[dict]:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    out = []
    for p in procs:
        try:
            stdout, _ = p.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            p.kill()
            stdout, _ = p.communicate()
        lines = [line for line in stdout.splitlines() if line.startswith("{")]
        out.append(json.loads(lines[-1]) if lines else {"failed": [f"worker {p.pid} exited {p.returncode}"]})
    return out


# -- report ----------------------------------------------------------------------------------------

def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def spread(values: list[float]) -> str:
    return f"min {min(values):g}, median {statistics.median(values):g}, max {max(values):g}"


def report_backends(watch: Watch, sites: list[str]) -> None:
    n = len(sites)
    for phase in ("idle", "load"):
        per = [watch.peak[phase][role(s)] for s in sites]
        last = [watch.last[phase][role(s)] for s in sites]
        names = ", ".join(f"'{k}' {v}" for k, v in sorted(watch.names[phase].items()))
        ok = max(per) <= TARGET_BACKENDS
        print(f"backends {phase} (sampled every {SAMPLE:g} s): most {watch.total[phase]} in all = "
              f"{watch.total[phase] / n:.2f} per agent, per agent {spread(per)} [target <= {TARGET_BACKENDS} per "
              f"agent: {verdict(ok)}]; at the end of the phase {sum(last)} = {sum(last) / n:.2f} per agent "
              f"({spread(last)}); by application_name (most of each): {names}")


def report_idle(r: dict, sites: list[str], seconds: float, method: str) -> None:
    n = len(sites)
    print(f"idle window {seconds:.0f} s; statements counted with {method}")
    if r["by_role"]:
        per = [r["by_role"].get(role(s), 0) * 60 / seconds for s in sites]
        mean = sum(per) / n
        print(f"idle statements: {sum(r['by_role'].values())} in all = {mean:.2f} per agent per minute "
              f"({mean * n / 60:.1f}/s for {n} agents); per agent per minute {spread([round(x, 2) for x in per])} "
              f"[target <= {TARGET_IDLE} for every agent: {verdict(max(per) <= TARGET_IDLE)}]")
        texts: Counter[str] = Counter()
        for text, k in r["texts"].items():  # one line per statement, whichever site's queue it names
            texts[re.sub(r"\bs\d{4}\b", "<site>", re.sub(r"tasks_s\d{4}", "tasks_<site>", text))] += k
        for text, k in texts.most_common(12):
            print(f"  {k * 60 / seconds / n:6.2f}/agent/min  {text}")
        if r["apps"]:
            apps: Counter[str] = Counter()
            for app, k in r["apps"].items():
                apps[app.replace(app.rsplit(" ", 1)[-1], "<id>") if app.startswith("agentd ") else app] += k
            print("  by application_name: " + ", ".join(f"'{a}' {k * 60 / seconds / n:.2f}/agent/min"
                                                      for a, k in apps.most_common()))
    print(f"idle transactions (pg_stat_database, the bench's own subtracted, autovacuum included): {r['xacts']} = "
          f"{r['xacts'] * 60 / seconds / n:.2f} per agent per minute")
    kb = r["backend_kb"]
    print(f"idle CPU: agents {r['cpu_agents']:.1f} s, postgres {r['cpu_postgres']:.1f} s in {seconds:.0f} s = "
          f"{1000 * r['cpu_agents'] / seconds / n:.2f} + {1000 * r['cpu_postgres'] / seconds / n:.2f} ms/s per "
          f"agent; worker RSS {sum(r['rss']):.0f} MB = {sum(r['rss']) / n:.1f} MB per agent; agent backends' "
          f"private memory mean {sum(kb) / max(1, len(kb)) / 1024:.1f} MB, max {max(kb, default=0) / 1024:.1f} MB")


def report_latency(lat: dict[tuple[str, int], float], sent: dict, sites: list[str], rate: float) -> None:
    values = list(lat.values())
    by_site: dict[str, list[float]] = defaultdict(list)
    for key, secs in lat.items():
        by_site[sent[key][0]].append(secs)
    missing = Counter(sent[k][0] for k in sent if k not in lat)
    ms = [1000 * v for v in values]
    print(f"load: {len(sent)} commands at {rate:g}/s over {len(sites)} sites; {len(lat)} verified, "
          f"{len(sent) - len(lat)} not; enqueue -> verified p50 {pct(ms, 0.5):.1f} ms, p95 {pct(ms, 0.95):.1f}, "
          f"p99 {pct(ms, 0.99):.1f}, max {max(ms):.1f}")
    site_max = {s: max(v) for s, v in by_site.items()}
    site_p50 = [statistics.median(v) * 1000 for v in by_site.values()]
    print(f"per site: p50 {spread([round(x, 1) for x in site_p50])} ms; slowest sites: " + ", ".join(
        f"{s} {1000 * t:.0f} ms" for s, t in sorted(site_max.items(), key=lambda kv: -kv[1])[:3]))
    bar = max(1.0, 5 * pct(values, 0.99))
    starved = sorted({*missing, *(s for s, t in site_max.items() if t > bar)})
    print(f"starved sites (a command unverified, or one slower than {bar:.1f} s = max(1 s, 5 x p99)): "
          f"{', '.join(starved) or 'none'} [target none: {verdict(not starved)}]")


def report_leaders(watch: Watch, workers: list[dict], sites: list[str]) -> None:
    per = [watch.elections(s) for s in sites]
    logged: Counter[str] = Counter()
    lost: Counter[str] = Counter()
    for w in workers:
        logged.update(w.get("leader", {}).get("leader_elected", {}))
        lost.update(w.get("leader", {}).get("leader_lost", {}))
    gaps = sum(1 for s in sites if None in watch.holders[s][1:])
    once = sum(1 for s in sites if logged[s] == 1 and watch.elections(s) == 1)
    print(f"leaders: holders sampled every {SAMPLE:g} s: elections per site {spread(per)}, {gaps} site(s) seen "
          f"without a leader after the first; agents' logs: {sum(logged.values())} leader_elected, "
          f"{sum(lost.values())} leader_lost; sites elected exactly once {once} of {len(sites)} "
          f"[target all: {verdict(once == len(sites))}]")
    actions: Counter[str] = Counter()
    for w in workers:
        actions.update(w.get("actions", {}))
    quiet = ("verified", "applied", "leader_elected", "listening", "started", "stopping", "stopped")
    noisy = Counter({k: v for k, v in actions.items() if k not in quiet})
    print(f"agents' log records by action (besides {', '.join(quiet)}): {dict(noisy.most_common(12))}")
    for w in workers:
        for f in w.get("failed", []):
            print(f"  agent failed: {f}")


# -- main ------------------------------------------------------------------------------------------

SHOWN = ("pool_size", "pool_idle_timeout", "statement_cache_size", "poll_interval", "heartbeat_interval",
         "listener_check_interval", "leader_check_interval", "notify_throttle_ms", "concurrency",
         "reconcile_schedule", "prune_interval", "http_listen")


def print_header(args: argparse.Namespace, pg_version: str, max_conn: str, dsn: str) -> None:
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(f"date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; git {revision()}")
    print(f"machine: {machine(pg_version)}; max_connections {max_conn}")
    s = load_settings(None, **agent_settings(dsn, site(0), args.pool_size))
    shown = ", ".join(f"{k}={getattr(s, k)!r}" for k in SHOWN if hasattr(s, k))
    print(f"agents: {args.agents} in {-(-args.agents // args.per_process)} process(es) of up to {args.per_process}, "
          f"each {args.devices_per_site} sim device(s) at {args.latency * 1000:g} ms per call, its own site, queue "
          f"and LOGIN role; settings changed from agentd's defaults: {fixed_settings(args.pool_size)}; "
          f"in effect: {shown}")


def revision() -> str:
    """git's HEAD here, or for a `git archive` of a commit (to measure that commit), its REVISION file."""
    stamp = Path(__file__).resolve().parents[1] / "REVISION"
    return git_rev() or (f"{stamp.read_text().strip()} (git archive)" if stamp.exists() else "?")


async def statement_method(conn: asyncpg.Connection, private: bool) -> str:
    if await has_pg_stat_statements(conn):
        return "pg_stat_statements"
    if private:
        return ("the server log (log_statement=all, by role): the pgserver wheel ships no pg_stat_statements "
                "(no .so, no .control), so shared_preload_libraries cannot load it")
    return "pg_stat_database transactions only (no pg_stat_statements, no access to the server log)"


async def run(args: argparse.Namespace) -> None:
    sites = [site(i) for i in range(args.agents)]
    cluster = None
    if args.dsn:
        admin_dsn = args.dsn
    else:
        max_conn = args.agents * (args.pool_size + 3) + 50  # room for agents that hold more than they should
        cluster = await private_cluster("agent-sites-", {"max_connections": str(max_conn)})
        admin_dsn, burst.PG_DATA = cluster.dsn, cluster.data
    procs: list[subprocess.Popen[str]] = []
    workers: list[dict] = []
    try:
        admin = await asyncpg.connect(admin_dsn)
        pg_version, max_c = await admin.fetchval("SHOW server_version"), await admin.fetchval("SHOW max_connections")
        await admin.close()
        print_header(args, pg_version, max_c, admin_dsn)
        t0 = time.monotonic()
        dsn = await prepare(admin_dsn, sites, args.devices_per_site, args.latency)
        conn, wconn = await asyncpg.connect(dsn), await asyncpg.connect(dsn)
        method = await statement_method(conn, cluster is not None)
        print(f"setup: database, {len(sites)} queues, roles and devices in {time.monotonic() - t0:.1f} s")
        logs = Path(args.worker_log)
        procs = [spawn(dsn, sites[i:i + args.per_process], args.pool_size, logs)
                 for i in range(0, len(sites), args.per_process)]
        watch = Watch(wconn, sites)
        watcher = asyncio.create_task(watch.run())
        print(f"start: all {len(sites)} agents registered and every site led after "
              f"{await wait_ready(conn, watch, procs, len(sites)):.1f} s; agents' warnings go to {logs}")
        await asyncio.sleep(15)
        stmts = StatementLog(admin_dsn, cluster.log) if cluster and method.startswith("the server log") else None
        idle = await measure_idle(conn, watch, stmts, method.split(" (")[0], args.idle_seconds, procs)
        watch.phase = "load"
        sent = await load(conn, sites, args.devices_per_site, args.rate, args.load_seconds)
        lat = await verified(conn, sent, 120)
        await asyncio.sleep(SAMPLE)
        watcher.cancel()
        workers = stop_workers(procs)
        report_backends(watch, sites)
        report_idle(idle, sites, args.idle_seconds, method)
        report_latency(lat, sent, sites, args.rate)
        report_leaders(watch, workers, sites)
    finally:
        if procs and not workers:
            stop_workers(procs)
        if cluster:
            cluster.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--agents", type=int, default=200)
    ap.add_argument("--devices-per-site", type=int, default=4)
    ap.add_argument("--latency", type=float, default=0.005, help="seconds per sim device call")
    ap.add_argument("--idle-seconds", type=float, default=300)
    ap.add_argument("--load-seconds", type=float, default=120)
    ap.add_argument("--rate", type=float, default=5.0, help="commands per second over all sites")
    ap.add_argument("--pool-size", type=int, default=1, help="AGENT_POOL_SIZE of every agent (1: the budget of 2)")
    ap.add_argument("--per-process", type=int, default=50, help="agents in one worker process")
    ap.add_argument("--dsn", help="a server to use instead of a private pgserver cluster (needs CREATEDB and "
                    "CREATEROLE, max_connections for the agents, and the sites' roles may log in without a password)")
    ap.add_argument("--worker-log", default="/tmp/bench-sites-agents.log")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    asyncio.run(worker(json.loads(args.worker)) if args.worker else run(args))


if __name__ == "__main__":
    main()
