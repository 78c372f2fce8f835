"""`agentctl doctor`: is this host, in this network namespace, able to run the agent?

Checks run in a fixed order, from the database to each device, and each ends in a line that says
what was found and, when it failed, what to do. A check that cannot run because an earlier one
failed says so. The whole answer is `ok` only when every check passed.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import asyncpg

from agent.db.connect import DB_ERRORS
from agent.db.queries import Queries
from agent.db.schema import SCHEMA_VERSION
from agent.drivers.base import ChecksPolicy, CredentialStore, DriverContext
from agent.drivers.registry import Drivers
from agent.errors import AgentError, ConfigError
from agent.inventory.cache import device_from_row, validate_with
from agent.model.device import Device
from agent.settings import Settings
from agent.vpn.guard import REMEDY as VPN_REMEDY
from agent.vpn.health import VpnSnapshot, judge_peer, peer_for
from agent.vpn.monitor import VpnMonitor, device_host

INIT = "run `agentctl db init` (idempotent)"


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    remedy: str | None = None
    skipped: bool = False  # could not run because an earlier check failed (counts as not passed)

    @property
    def word(self) -> str:
        return "PASS" if self.ok else "SKIP" if self.skipped else "FAIL"


def skipped(name: str, why: str) -> Check:
    return Check(name, False, f"not checked: {why}", skipped=True)


@dataclass
class Report:
    checks: list[Check]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def as_json(self) -> str:
        return json.dumps({"ok": self.ok, "checks": [asdict(c) for c in self.checks]}, indent=2)

    def as_text(self) -> str:
        lines = []
        for c in self.checks:
            lines.append(f"{c.word}  {c.name}: {c.detail}")
            if not c.ok and c.remedy:
                lines.append(f"      fix: {c.remedy}")
        failed = sum(not c.ok and not c.skipped for c in self.checks)
        skipped = sum(c.skipped for c in self.checks)
        lines.append("all checks passed" if self.ok else f"{failed} of {len(self.checks)} checks failed"
                     + (f", {skipped} not checked" if skipped else ""))
        return "\n".join(lines)


KNOWN = "SELECT device, service FROM agent.service_state WHERE device = ANY($1::text[]) ORDER BY device, service"


async def run(settings: Settings, drivers: Drivers | None = None) -> Report:
    checks: list[Check] = []
    known: dict[str, list[str]] = {}
    devices = await _database_checks(settings, checks, known)
    vpn = await tunnel_checks(settings, devices, checks.append)
    own = drivers is None
    drivers = drivers or Drivers(DriverContext(settings.device_timeout, CredentialStore(settings.credentials_dir)))
    checks.extend(credential_checks(devices, CredentialStore(settings.credentials_dir)))
    try:
        await _probe_checks(settings, devices, vpn, drivers, checks, known)
    finally:
        if own:
            await drivers.close()
    return Report(checks)


async def _database_checks(s: Settings, checks: list[Check], known: dict[str, list[str]]) -> list[Device] | None:
    """Database, PGMQ, schema, queues, notifications; the site's devices when they can be read, and
    into `known` the services the agent has state for on each (for the suspension-policy check)."""
    q = Queries(s.queue)
    try:
        conn = await asyncpg.connect(s.database_url, timeout=10, server_settings={"application_name": "agentctl"})
    except DB_ERRORS as exc:
        checks.append(Check("database reachable", False, f"cannot connect: {exc}",
                            "check AGENT_DATABASE_URL, that Postgres runs, and that this host may connect"))
        for name in ("PGMQ installed", "schema version", "queue and DLQ", "notify trigger", "inventory"):
            checks.append(skipped(name, "no database"))
        return None
    try:
        version = await conn.fetchval("SHOW server_version")
        checks.append(Check("database reachable", True, f"PostgreSQL {version}"))
        pgmq = await conn.fetchval("SELECT to_regclass('pgmq.meta') IS NOT NULL")
        checks.append(Check("PGMQ installed", True, "schema pgmq present") if pgmq else
                      Check("PGMQ installed", False, "schema pgmq is missing", INIT))
        have = await conn.fetchval("SELECT to_regclass('agent.schema_version') IS NOT NULL")
        current = await conn.fetchval(q.schema_version) if have else None
        if current == SCHEMA_VERSION:
            checks.append(Check("schema version", True, f"{current} (current)"))
        elif current is not None and current > SCHEMA_VERSION:
            checks.append(Check("schema version", False, f"{current}, newer than this agent's {SCHEMA_VERSION}",
                                "upgrade the agent on this host"))
        else:
            checks.append(Check("schema version", False, f"{current or 'none'}, this agent needs {SCHEMA_VERSION}",
                                INIT))
        queues = pgmq and await conn.fetchval(q.queue_exists, q.queue, q.dlq)
        checks.append(Check("queue and DLQ", True, f"{q.queue}, {q.dlq}") if queues else
                      Check("queue and DLQ", False, f"{q.queue} or {q.dlq} is missing",
                            f"{INIT} with AGENT_QUEUE={q.queue}"))
        notify = queues and await conn.fetchval(q.notify_enabled, q.queue)
        checks.append(Check("notify trigger", True, f"insert notifications on for {q.queue}") if notify else
                      Check("notify trigger", False, "insert notifications are off (the agent re-enables them at "
                            "start; until then it only polls)", f"start agentd, or {INIT}"))
        if not have:
            checks.append(Check("inventory", False, "agent.devices is missing", INIT))
            return None
        rows = await conn.fetch(q.load_devices, s.site)
        devices = [device_from_row(r) for r in rows]
        for row in await conn.fetch(KNOWN, [d.id for d in devices]):
            known.setdefault(row["device"], []).append(row["service"])
        checks.append(Check("inventory", True, f"{len(devices)} device(s) in site {s.site}") if devices else
                      Check("inventory", True, f"no devices in site {s.site} (add some with `agentctl device add`)"))
        return devices
    except DB_ERRORS as exc:
        checks.append(Check("database queries", False, str(exc), "check the database user's rights on "
                            "schemas pgmq and agent"))
        return None
    finally:
        await conn.close()


@dataclass
class TunnelFacts:
    snap: VpnSnapshot
    hosts: dict[str, str]  # device id -> IP

    def passable(self, device: Device, required: bool) -> bool:
        host = self.hosts.get(device.id)
        if host is None:
            return True
        via = self.snap.routes.get(host)
        return (via is not None and not required) or (via == self.snap.interface and self.snap.interface_up)


async def tunnel_checks(s: Settings, devices: list[Device] | None, add: Callable[[Check], None]) -> TunnelFacts:
    hosts = {d.id: h for d in devices or [] for h in [device_host(d.address)] if h}
    unresolved = [d.id for d in devices or [] if d.address and d.id not in hosts]
    monitor = VpnMonitor(s.wg_interface, s.vpn_stale_after)
    snap = await monitor.sample(sorted(set(hosts.values())))
    needed = s.require_vpn and (bool(hosts) or devices is None)
    if snap.interface is None:
        if needed:
            add(Check("WireGuard interface", False, snap.problem or "no WireGuard interface", VPN_REMEDY))
        else:
            why = "AGENT_REQUIRE_VPN=false" if not s.require_vpn else "no device has a network address"
            add(Check("WireGuard interface", True, f"none, not needed ({why})"))
    elif not snap.interface_up:
        add(Check("WireGuard interface", False, f"{snap.interface} is down",
                  f"bring it up: `ip link set {snap.interface} up` (or restart the wireguard container/unit)"))
    else:
        add(Check("WireGuard interface", True, f"{snap.interface} is up, {len(snap.peers)} peer(s)"))
    now = time.time()
    for peer in snap.peers:
        v = judge_peer(peer, now, None, s.vpn_stale_after)
        covers = sorted(d for d, h in hosts.items() if peer_for(h, snap.peers) is peer)
        detail = f"{v.reason}, endpoint {peer.endpoint or 'unknown'}, received {peer.rx_bytes} B, " \
                 f"sent {peer.tx_bytes} B" + (f"; devices {', '.join(covers)}" if covers else "")
        add(Check(f"peer {peer.name} handshake", v.up, detail, None if v.up else
                  "check the peer's endpoint is reachable (UDP) and that both sides know each other's public key"))
    for dev_id, host in sorted(hosts.items()):
        via = snap.routes.get(host)
        if via is None:
            add(Check(f"route to {dev_id}", False, f"no route to {host}",
                      "add a route for the site network through the WireGuard interface (its AllowedIPs and the "
                      "routing table)"))
        elif via == snap.interface:
            owner = peer_for(host, snap.peers)
            if owner is None:
                add(Check(f"route to {dev_id}", False, f"{host} leaves by {via}, but no peer's allowed IPs cover it",
                          "add the site network to the peer's AllowedIPs"))
            else:
                add(Check(f"route to {dev_id}", True, f"{host} via {via}, peer {owner.name}"))
        elif s.require_vpn:
            add(Check(f"route to {dev_id}", False, f"{host} leaves by {via}, not through "
                      f"{snap.interface or 'a WireGuard interface'}", VPN_REMEDY))
        else:
            add(Check(f"route to {dev_id}", True, f"{host} via {via} (directly attached, AGENT_REQUIRE_VPN=false)"))
    for dev_id in unresolved:
        add(Check(f"route to {dev_id}", False, "its address does not resolve to an IP",
                  "fix the device's address (`agentctl device add ... --address`) or this host's DNS"))
    return TunnelFacts(snap, hosts)


def credential_checks(devices: list[Device] | None, store: CredentialStore) -> list[Check]:
    """Every device's credential is there and readable. Its value is read to know that, never shown."""
    out = []
    for dev in devices or []:
        if not dev.credential:
            continue
        name = f"credential {dev.credential} ({dev.id})"
        try:
            store.get(dev.credential)
        except ConfigError as exc:
            out.append(Check(name, False, str(exc), f"put the secret in a file named {dev.credential!r} in "
                             "$CREDENTIALS_DIRECTORY (systemd LoadCredential=) or AGENT_CREDENTIALS_DIR "
                             "(compose: /run/secrets), readable by the agent's user only"))
        except (OSError, UnicodeError) as exc:
            out.append(Check(name, False, f"cannot read it: {type(exc).__name__}",
                             "make the file readable by the agent's user (mode 0600, owned by that user)"))
        else:
            out.append(Check(name, True, "present and readable"))
    return out


async def _probe_checks(s: Settings, devices: list[Device] | None, vpn: TunnelFacts, drivers: Drivers,
                        checks: list[Check], known: dict[str, list[str]] | None = None) -> None:
    async def probe(dev: Device) -> Check:
        name = f"probe {dev.id}"
        try:
            driver = drivers.get(dev.driver)
            validate_with(driver, dev)
        except AgentError as exc:
            return Check(name, False, str(exc), "fix the device's driver or options in the inventory")
        if not vpn.passable(dev, s.require_vpn):
            return skipped(name, "no usable route to it (see above)")
        try:
            async with asyncio.timeout(s.device_timeout + 1):
                await driver.probe(dev)
        except AgentError as exc:
            return Check(name, False, str(exc), "the tunnel is up but the device does not answer: check the device, "
                         "its address and port, and its firewall")
        except TimeoutError:
            return Check(name, False, f"no answer within {s.device_timeout:g} s",
                         "the tunnel is up but the device does not answer: check the device and its firewall")
        return Check(name, True, f"answers ({dev.driver}{', ' + dev.address if dev.address else ''})")

    probes = await asyncio.gather(*(probe(d) for d in devices or []))
    checks.extend(probes)
    answered = [d for d, c in zip(devices or [], probes, strict=True) if c.ok]
    checks.extend(c for c in await asyncio.gather(*(policy_check(s, d, drivers, (known or {}).get(d.id, []))
                                                    for d in answered)) if c is not None)


async def policy_check(s: Settings, dev: Device, drivers: Drivers, known: list[str]) -> Check | None:
    """A driver that can tell (routeros): does a suspension through the device's address lists block
    anyone, i.e. does an enabled firewall rule use each of them? None for drivers that cannot tell."""
    driver = drivers.get(dev.driver)
    if not isinstance(driver, ChecksPolicy):
        return None
    name = f"suspension policy {dev.id}"
    try:
        async with asyncio.timeout(4 * (s.device_timeout + 1)):
            problems = await driver.check_policy(dev, known)
    except (AgentError, TimeoutError) as exc:
        return Check(name, False, str(exc) or "no answer", "check the device with `agentctl device test`")
    if problems:
        return Check(name, False, "; ".join(problems), "add an enabled firewall rule that uses each list named "
                     "(filter, nat, mangle or raw), or stop suspending through it")
    return Check(name, True, "every address list in use is used by an enabled firewall rule")

