"""The radius driver against real FreeRADIUS 3.2: the policy it writes is the one FreeRADIUS enforces (asked
with an Access-Request after each command), and the NAS side (a FreeRADIUS DAS) receives the Disconnect- or
CoA-Requests for exactly the users concerned, with the attributes radacct names the session by."""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest

from agent.drivers.base import CredentialStore, DriverContext
from agent.drivers.radius import RadiusDriver
from agent.errors import ConfigError, PermanentError, UnreachableError
from agent.model.device import Device
from agent.ops import admin, devicetest
from tests.support.agents import running_agent
from tests.support.db import archived, dlq, events, send
from tests.support.freeradius import NAS_IP, FreeRadius, add_user, create_store, free_udp_port, freeradius_available
from tests.support.pg import create_database, drop_database
from tests.support.wait import until
from tests.support.wan import UdpRelay

pytestmark = pytest.mark.skipif(freeradius_available() is not None, reason=str(freeradius_available()))
_ids = itertools.count()


async def all_archived(db: asyncpg.Connection, ids: list[int]) -> bool:
    return all([await archived(db, i) for i in ids])


@dataclass
class Radius:
    fr: FreeRadius
    dsn: str
    context: DriverContext
    creds: Path

    def device(self, address: str | None = None, credential: str = "nas-secret", **options: object) -> Device:
        opts = {"policy_credential": "radius-db", "timeout": 3.0, "retries": 1, "settle": 3.0, **options}
        return Device("nas-1", "radius", address or self.fr.das_address, options=opts, credential=credential)

    async def subscriber(self) -> str:
        name = f"sub{next(_ids)}@isp"
        await add_user(self.dsn, name, f"pw-{name}")
        return name

    async def access(self, user: str) -> str:
        return await self.fr.access(user, f"pw-{user}")

    def disconnects(self, user: str, kind: str = "Disconnect-Request") -> list[dict[str, str]]:
        return [r.attributes for r in self.fr.das_requests() if r.kind == kind and r.attributes["User-Name"] == user]

    async def fetch(self, query: str, *args: object) -> list[asyncpg.Record]:
        conn = await asyncpg.connect(self.dsn)
        try:
            return await conn.fetch(query, *args)
        finally:
            await conn.close()

    async def fetchval(self, query: str, *args: object) -> object:
        return (await self.fetch(query, *args))[0][0]


@pytest.fixture(scope="module")
async def radius(pg_admin_dsn: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Radius]:
    dsn = await create_database(pg_admin_dsn)
    await create_store(dsn)
    fr = await asyncio.to_thread(FreeRadius, dsn)
    creds = tmp_path_factory.mktemp("radius-credentials")
    (creds / "nas-secret").write_text(fr.das_secret)
    (creds / "wrong-secret").write_text("not-the-das-secret")
    (creds / "radius-db").write_text(dsn)
    (creds / "bad-db").write_text(dsn.replace("postgresql://postgres", "postgresql://no_such_role"))
    try:
        yield Radius(fr, dsn, DriverContext(device_timeout=5.0, credentials=CredentialStore(Path(creds))), creds)
    finally:
        await asyncio.to_thread(fr.close)
        await drop_database(pg_admin_dsn, dsn)


@pytest.fixture
async def drv(radius: Radius) -> AsyncIterator[RadiusDriver]:
    driver = RadiusDriver(radius.context)
    yield driver
    await driver.close()


async def test_off_suspends_so_that_freeradius_rejects_the_subscriber(radius: Radius, drv: RadiusDriver) -> None:
    user = await radius.subscriber()
    assert await radius.access(user) == "accept"
    assert await drv.read(radius.device(), f"user/{user}") == "on"
    await drv.apply(radius.device(), f"user/{user}", "off")
    assert await radius.access(user) == "reject"
    assert await drv.read(radius.device(), f"user/{user}") == "off"
    rows = await radius.fetch("SELECT groupname, priority FROM radusergroup WHERE username = $1 ORDER BY priority",
                              user)
    assert [tuple(r) for r in rows] == [("suspended", 0), ("plan", 1)]


async def test_on_restores_so_that_freeradius_accepts_again(radius: Radius, drv: RadiusDriver) -> None:
    user = await radius.subscriber()
    await drv.apply(radius.device(), f"user/{user}", "off")
    await drv.apply(radius.device(), f"user/{user}", "on")
    assert await radius.access(user) == "accept"
    assert await drv.read(radius.device(), f"user/{user}") == "on"


async def test_off_ends_the_live_session_named_as_radacct_has_it(radius: Radius, drv: RadiusDriver) -> None:
    user = await radius.subscriber()
    await radius.fr.start_session(user, f"sess-{user}", "10.9.0.7")
    assert await drv.read(radius.device(), f"user/{user}") == "on"
    await drv.apply(radius.device(), f"user/{user}", "off")
    [sent] = radius.disconnects(user)
    assert sent["Acct-Session-Id"] == f"sess-{user}"
    assert sent["Framed-IP-Address"] == "10.9.0.7"
    assert sent["NAS-IP-Address"] == NAS_IP
    assert not await radius.fetch("SELECT 1 FROM nas_sessions WHERE username = $1", user)
    assert await drv.read(radius.device(), f"user/{user}") == "off"
    assert await radius.access(user) == "reject"  # the NAS's re-authentication is refused


async def test_a_session_the_nas_does_not_have_is_fine_and_its_stale_radacct_row_closed(
        radius: Radius, drv: RadiusDriver) -> None:
    user = await radius.subscriber()
    await radius.fr.start_session(user, f"sess-{user}", "10.9.0.8")
    await radius.fetch("DELETE FROM nas_sessions WHERE username = $1", user)  # its Accounting-Stop was lost
    await drv.apply(radius.device(), f"user/{user}", "off")
    [row] = await radius.fetch("SELECT acctstoptime, acctterminatecause FROM radacct WHERE username = $1", user)
    assert row["acctstoptime"] is not None and row["acctterminatecause"] == "Session-Context-Not-Found"
    assert await drv.read(radius.device(), f"user/{user}") == "off"


async def test_without_a_known_session_the_nas_is_asked_by_user_name(radius: Radius, drv: RadiusDriver) -> None:
    user = await radius.subscriber()
    await drv.apply(radius.device(accounting=False), f"user/{user}", "off")
    [sent] = radius.disconnects(user)
    assert "Acct-Session-Id" not in sent and sent["User-Name"] == user


async def test_a_wrong_shared_secret_is_dropped_by_freeradius_and_ends_in_a_config_error_naming_the_credential(
        radius: Radius, drv: RadiusDriver) -> None:
    user = await radius.subscriber()
    before = len(radius.fr.das_requests())
    device = radius.device(credential="wrong-secret", timeout=1.0)
    with pytest.raises(ConfigError) as caught:
        await drv.apply(device, f"user/{user}", "off")
    assert "'wrong-secret'" in str(caught.value) and "shared secret" in str(caught.value)
    assert "not-the-das-secret" not in str(caught.value) and radius.fr.das_secret not in str(caught.value)
    assert len(radius.fr.das_requests()) == before  # FreeRADIUS dropped it: nothing was acted on
    assert "Shared secret is incorrect" in radius.fr.log() and "Dropping packet without response" in radius.fr.log()
    with pytest.raises(ConfigError, match="'wrong-secret'"):
        await drv.probe(device)


async def test_a_nas_that_refuses_dynamic_authorization_is_unreachable(radius: Radius, drv: RadiusDriver) -> None:
    user = await radius.subscriber()
    device = radius.device(f"127.0.0.1:{free_udp_port()}", nas_ip=NAS_IP)
    with pytest.raises(UnreachableError, match="accept=yes"):
        await drv.apply(device, f"user/{user}", "off")
    with pytest.raises(UnreachableError):
        await drv.probe(device)


async def test_coa_changes_the_live_session_instead_of_ending_it(radius: Radius, drv: RadiusDriver) -> None:
    user = await radius.subscriber()
    await radius.fr.start_session(user, f"sess-{user}", "10.9.0.9")
    device = radius.device(suspend="coa", coa_attributes={"Mikrotik-Address-List": "suspended"}, restore="coa",
                           restore_coa_attributes={"Mikrotik-Address-List": "active"})
    await drv.apply(device, f"user/{user}", "off")
    [sent] = radius.disconnects(user, "CoA-Request")
    assert sent["Mikrotik-Address-List"] == "suspended" and sent["Acct-Session-Id"] == f"sess-{user}"
    assert await radius.fetch("SELECT 1 FROM nas_sessions WHERE username = $1", user)  # still up
    assert await drv.read(device, f"user/{user}") == "off"
    await drv.apply(device, f"user/{user}", "on")
    assert [r["Mikrotik-Address-List"] for r in radius.disconnects(user, "CoA-Request")] == ["suspended", "active"]
    assert await radius.access(user) == "accept"


async def test_restore_none_changes_only_the_policy(radius: Radius, drv: RadiusDriver) -> None:
    user = await radius.subscriber()
    device = radius.device(restore="none")
    await drv.apply(device, f"user/{user}", "off")
    await drv.apply(device, f"user/{user}", "on")
    assert len(radius.disconnects(user)) == 1  # the suspension's only
    assert await radius.access(user) == "accept"


async def test_read_many_reads_every_user_in_one_go(radius: Radius, drv: RadiusDriver) -> None:
    on, off = await radius.subscriber(), await radius.subscriber()
    await drv.apply(radius.device(), f"user/{off}", "off")
    states = await drv.read_many(radius.device(), [f"user/{on}", f"user/{off}", "user/nobody-here", "port/1"])
    assert states[f"user/{on}"] == "on" and states[f"user/{off}"] == "off"
    assert isinstance(states["user/nobody-here"], PermanentError)
    assert isinstance(states["port/1"], PermanentError)


async def test_a_bad_service_key_is_refused_before_any_io(radius: Radius, drv: RadiusDriver) -> None:
    device = radius.device(f"127.0.0.1:{free_udp_port()}", nas_ip=NAS_IP, policy_credential="bad-db")
    start = time.monotonic()
    for call in (drv.read(device, "user/"), drv.apply(device, "subscriber/x", "off")):
        with pytest.raises(PermanentError):
            await call
    assert time.monotonic() - start < 1.0


async def test_a_policy_store_that_refuses_the_dsn_is_a_config_error(radius: Radius, drv: RadiusDriver) -> None:
    user = await radius.subscriber()
    with pytest.raises(ConfigError, match="bad-db"):
        await drv.read(radius.device(policy_credential="bad-db"), f"user/{user}")


async def test_an_unknown_subscriber_is_permanent_and_gets_no_row(radius: Radius, drv: RadiusDriver) -> None:
    with pytest.raises(PermanentError, match="no such subscriber"):
        await drv.apply(radius.device(), "user/never-was", "off")
    assert not await radius.fetch("SELECT 1 FROM radusergroup WHERE username = 'never-was'")


async def test_probe_checks_the_store_the_group_and_the_nas(radius: Radius, drv: RadiusDriver) -> None:
    await drv.probe(radius.device())
    assert any(r.attributes["User-Name"] == "pgmq-edge-agent-probe" for r in radius.fr.das_requests())
    with pytest.raises(ConfigError, match="suspends nobody"):
        await drv.probe(radius.device(suspended_group="no-such-group"))


async def test_a_month_end_burst_suspends_every_subscriber_once(radius: Radius, drv: RadiusDriver) -> None:
    users = [await radius.subscriber() for _ in range(200)]
    for user in users[::2]:
        await radius.fr.start_session(user, f"sess-{user}", "10.10.0.1")
    gate = asyncio.Semaphore(16)  # the executor's max_parallel for one device

    async def off(user: str) -> None:
        async with gate:
            await drv.apply(radius.device(timeout=10.0), f"user/{user}", "off")

    await asyncio.gather(*(off(u) for u in users))
    states = await drv.read_many(radius.device(), [f"user/{u}" for u in users])
    assert set(states.values()) == {"off"}
    assert all(len(radius.disconnects(u)) == 1 for u in users)
    assert [await radius.access(u) for u in users[:5]] == ["reject"] * 5


async def test_a_take_writes_every_suspension_in_one_statement_then_ends_the_sessions(
        radius: Radius, drv: RadiusDriver) -> None:
    users = [await radius.subscriber() for _ in range(120)]
    for user in users[::3]:
        await radius.fr.start_session(user, f"sess-{user}", "10.12.0.1")
    device = radius.device(timeout=10.0, max_parallel=16)
    wanted = {f"user/{u}": "off" for u in users} | {"user/nobody-such@isp": "off", "user/": "off"}
    found = await drv.apply_many(device, wanted)  # type: ignore[arg-type]
    assert {s for s, e in found.items() if e is None} == {f"user/{u}" for u in users}
    assert "no such subscriber" in str(found["user/nobody-such@isp"]) and found["user/"] is not None
    # one statement, one transaction: every suspended row carries the same xmin
    assert await radius.fetchval("SELECT count(DISTINCT xmin::text) FROM radusergroup WHERE groupname = 'suspended' "
                                 "AND username = ANY($1::text[])", users) == 1
    assert all(len(radius.disconnects(u)) == 1 for u in users)
    states = await drv.read_many(device, [f"user/{u}" for u in users])
    assert set(states.values()) == {"off"}
    restored = await drv.apply_many(device, {f"user/{u}": "on" for u in users[:30]})  # type: ignore[arg-type]
    assert set(restored.values()) == {None}
    assert [await radius.access(u) for u in (users[0], users[40])] == ["accept", "reject"]


async def test_a_suspended_row_that_sorts_after_the_plan_suspends_nobody_until_moved_first(
        radius: Radius, drv: RadiusDriver) -> None:
    user = await radius.subscriber()
    await radius.fetch("INSERT INTO radusergroup (username, groupname, priority) VALUES ($1, 'suspended', 5)", user)
    assert await radius.access(user) == "accept"  # rlm_sql walks groups by priority and stops at the plan
    assert await drv.read(radius.device(), f"user/{user}") == "on"
    await drv.apply(radius.device(), f"user/{user}", "off")
    assert await radius.access(user) == "reject"
    rows = await radius.fetch("SELECT priority FROM radusergroup WHERE username = $1 AND groupname = 'suspended'", user)
    assert [r["priority"] for r in rows] == [0]


def documented_grants(role: str) -> list[str]:
    """The CREATE ROLE and GRANT statements docs/drivers.md gives the operator, for `role`."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "drivers.md").read_text()
    section = text[text.index("## Built-in: `radius`"):text.index("The same in MySQL/MariaDB")]
    lines = [line for line in section.splitlines() if re.match(r"(CREATE ROLE|GRANT) ", line)]
    assert lines, "docs/drivers.md lost the radius grants"
    return [line.replace("radius_agent", role).replace("PASSWORD '…'", "") for line in lines]


async def test_the_grants_the_docs_give_are_enough(radius: Radius, drv: RadiusDriver) -> None:
    role = f"radius_agent_{secrets.token_hex(4)}"
    for statement in documented_grants(role):
        await radius.fetch(statement)
    try:
        (radius.creds / "agent-db").write_text(radius.dsn.replace("postgresql://postgres", f"postgresql://{role}"))
        device = radius.device(policy_credential="agent-db")
        user = await radius.subscriber()
        await radius.fr.start_session(user, f"sess-{user}", "10.9.0.11")
        stale = await radius.subscriber()
        await radius.fr.start_session(stale, f"sess-{stale}", "10.9.0.12")
        await radius.fetch("DELETE FROM nas_sessions WHERE username = $1", stale)
        await drv.probe(device)
        for u in (user, stale):
            await drv.apply(device, f"user/{u}", "off")
            assert await drv.read(device, f"user/{u}") == "off"
            await drv.apply(device, f"user/{u}", "on")
            assert await drv.read(device, f"user/{u}") == "on"
    finally:
        await drv.close()
        await radius.fetch(f'DROP OWNED BY "{role}"')
        await radius.fetch(f'DROP ROLE "{role}"')


async def test_device_test_checks_both_halves_and_says_which_failed(radius: Radius) -> None:
    good = await devicetest.run(radius.device(), "nas-1", None, radius.context)
    assert good.ok, devicetest.as_text(good)
    empty = await devicetest.run(radius.device(suspended_group="nobody-defined-this"), "nas-1", None, radius.context)
    probe = next(s for s in empty.steps if s.name == "probe")
    assert not probe.ok and probe.kind == "config" and "suspends nobody" in probe.detail
    wrong = await devicetest.run(radius.device(credential="wrong-secret", timeout=1.0), "nas-1", None, radius.context)
    probe = next(s for s in wrong.steps if s.name == "probe")
    assert not probe.ok and probe.kind == "config" and "'wrong-secret'" in probe.detail and "dropped" in probe.detail
    assert "not-the-das-secret" not in devicetest.as_text(wrong)


async def test_month_end_through_the_agent_every_suspension_applied_once_and_verified(
        radius: Radius, db: asyncpg.Connection, dsn: str) -> None:
    users = [await radius.subscriber() for _ in range(60)]
    for user in users[:20]:
        await radius.fr.start_session(user, f"sess-{user}", "10.11.0.1")
    device = radius.device(max_parallel=8, timeout=10.0)
    await admin.upsert_devices(db, [device])
    async with running_agent(dsn, RadiusDriver(radius.context), require_vpn=False):
        ids = [await send(db, {"device": device.id, "service": f"user/{u}", "state": "off"}) for u in users]
        try:
            await until(lambda: all_archived(db, ids), timeout=60, what="every suspension archived")
        except AssertionError:
            errors = await db.fetch("SELECT service, last_error FROM agent.service_state WHERE last_error IS NOT NULL")
            raise AssertionError(f"not all archived; errors: {[tuple(r) for r in errors][:5]}") from None
    rows = await db.fetch("SELECT service, observed FROM agent.service_state WHERE device = $1", device.id)
    assert {r["service"]: r["observed"] for r in rows} == {f"user/{u}": "off" for u in users}
    assert all(len(radius.disconnects(u)) == 1 for u in users)  # each applied once
    assert [await radius.access(u) for u in users[::15]] == ["reject"] * 4
    # a take is one policy statement: far fewer transactions wrote the rows than there were suspensions
    writes = await radius.fetchval("SELECT count(DISTINCT xmin::text) FROM radusergroup WHERE groupname = "
                                   "'suspended' AND username = ANY($1::text[])", users)
    assert writes < len(users) // 4, writes


async def test_a_lost_accounting_stop_is_seen_by_the_read_back_and_the_retry_closes_it(
        radius: Radius, drv: RadiusDriver) -> None:
    user = await radius.subscriber()
    await radius.fr.start_session(user, f"sess-{user}", "10.9.0.13")
    await radius.fetch("INSERT INTO nas_lost_stop VALUES ($1)", user)
    device = radius.device(settle=0.3)
    await drv.apply(device, f"user/{user}", "off")  # ACKed, but radacct still says the session is open
    assert await drv.read(device, f"user/{user}") == "on"  # not verified: the executor retries
    await drv.apply(device, f"user/{user}", "off")  # the NAS: no such session (503), so the row is stale
    assert await drv.read(device, f"user/{user}") == "off"
    [row] = await radius.fetch("SELECT acctterminatecause FROM radacct WHERE username = $1", user)
    assert row["acctterminatecause"] == "Session-Context-Not-Found"


async def test_through_a_lossy_link_every_suspension_is_acted_on_once(radius: Radius, drv: RadiusDriver) -> None:
    """A VPN that loses and duplicates datagrams: a lost request or reply is sent again as the same packet,
    which the NAS recognises as a retransmission (FreeRADIUS keeps its answer for cleanup_delay, as NASes
    do), and a duplicated reply is ignored: every subscriber is suspended, and the NAS acted once each."""
    users = [await radius.subscriber() for _ in range(60)]
    for user in users[::2]:
        await radius.fr.start_session(user, f"sess-{user}", "10.12.0.1")
    async with UdpRelay(("127.0.0.1", radius.fr.das_port), delay=0.005, jitter=0.01, drop=0.1, duplicate=0.3,
                        seed=5) as relay:
        # every try within FreeRADIUS's cleanup_delay (5 s); 7 tries all lost: ~1e-5 per request
        device = radius.device(relay.address, nas_ip=NAS_IP, timeout=4.0, retries=6)
        gate = asyncio.Semaphore(8)

        async def off(user: str) -> None:
            async with gate:
                await drv.apply(device, f"user/{user}", "off")

        await asyncio.gather(*(off(u) for u in users))
    assert relay.stats["dropped"] and relay.stats["duplicated"]
    states = await drv.read_many(radius.device(), [f"user/{u}" for u in users])
    assert set(states.values()) == {"off"}
    assert [u for u in users if len(radius.disconnects(u)) != 1] == []


async def test_through_the_agent_a_wrong_secret_parks_the_command_until_the_credential_is_fixed(
        radius: Radius, db: asyncpg.Connection, dsn: str) -> None:
    """A config error naming the credential (never the secret): no retry can fix it, so the command is parked,
    not dead-lettered; once the operator puts the right secret in the credential it goes through."""
    user = await radius.subscriber()
    await radius.fr.start_session(user, f"sess-{user}", "10.9.0.21")
    (radius.creds / "fixable-secret").write_text("not-the-das-secret")
    device = Device("nas-fixable", "radius", radius.fr.das_address, credential="fixable-secret",
                    options={"policy_credential": "radius-db", "timeout": 1.0, "retries": 1})
    await admin.upsert_devices(db, [device])
    async with running_agent(dsn, RadiusDriver(radius.context), require_vpn=False):
        msg_id = await send(db, {"device": device.id, "service": f"user/{user}", "state": "off"})

        async def parked() -> bool:
            row = await db.fetchrow("SELECT last_error FROM agent.service_state WHERE device = $1", device.id)
            return row is not None and (row["last_error"] or "").startswith("parked: device_misconfigured:")

        await until(parked, timeout=30, what="the command parked as misconfigured")
        row = await db.fetchrow("SELECT last_error FROM agent.service_state WHERE device = $1", device.id)
        assert "'fixable-secret'" in row["last_error"] and "not-the-das-secret" not in row["last_error"]
        assert "parked" in await events(db, msg_id) and "dead_lettered" not in await events(db, msg_id)
        assert not [e for e in await dlq(db) if e["id"] == msg_id]
        assert await radius.access(user) == "reject"  # the policy is written before the NAS is asked: the session waits
        assert radius.disconnects(user) == []
        (radius.creds / "fixable-secret").write_text(radius.fr.das_secret)  # the operator fixes it
        await until(lambda: archived(db, msg_id), timeout=60, what="the command through once the secret is right")
    assert len(radius.disconnects(user)) == 1  # the live session ended, once
    assert await radius.access(user) == "reject"
    assert "not-the-das-secret" not in json.dumps([dict(r) for r in await db.fetch(
        "SELECT kind, error FROM agent.events WHERE msg_id = $1", msg_id)], default=str)
