"""The radius driver with its policy store in MariaDB (FreeRADIUS's own MySQL schema, through aiomysql), against
real FreeRADIUS reading the same database through rlm_sql_mysql: the policy the driver writes is the one
FreeRADIUS enforces (asked with an Access-Request), the sessions radacct holds are the ones the NAS is told to
end, and a DSN MariaDB refuses is a configuration error naming the credential. The dialect's statements and
the error mapping are the same driver's as for PostgreSQL (test_radius.py); these pin the MySQL half."""

from __future__ import annotations

import asyncio
import itertools
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.drivers.base import CredentialStore, DriverContext
from agent.drivers.radius import RadiusDriver
from agent.errors import ConfigError, PermanentError, UnreachableError
from agent.model.device import Device
from agent.ops import devicetest
from tests.support.freeradius import MYSQL_STORE, FreeRadius, freeradius_available
from tests.support.mariadb import MariaDb, free_tcp_port, mariadb_available

pytestmark = pytest.mark.skipif((freeradius_available() or mariadb_available()) is not None,
                                reason=str(freeradius_available() or mariadb_available()))
_ids = itertools.count()


@dataclass
class Store:
    db: MariaDb
    fr: FreeRadius
    dsn: str
    context: DriverContext
    creds: Path

    def device(self, credential: str = "nas-secret", **options: object) -> Device:
        opts = {"policy_credential": "radius-db", "timeout": 3.0, "retries": 1, "settle": 3.0, **options}
        return Device("nas-m", "radius", self.fr.das_address, options=opts, credential=credential)

    async def subscriber(self, name: str | None = None) -> str:
        name = name or f"msub{next(_ids)}@isp"
        await self.fr.store_execute("INSERT INTO radcheck (username, attribute, op, value) "
                                    "VALUES ({}, 'Cleartext-Password', ':=', {})", name, f"pw-{name}")
        await self.fr.store_execute("INSERT INTO radusergroup (username, groupname, priority) VALUES ({}, 'plan', 1)",
                                    name)
        return name

    async def access(self, user: str) -> str:
        return await self.fr.access(user, f"pw-{user}")

    async def rows(self, query: str, *args: object) -> list[tuple[object, ...]]:
        return await self.fr.store_fetch(query, *args)


@pytest.fixture(scope="module")
async def store(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Store]:
    db = await asyncio.to_thread(MariaDb)
    try:
        dsn, name, user, _ = await asyncio.to_thread(db.database, MYSQL_STORE)
        fr = await asyncio.to_thread(FreeRadius, dsn)
        creds = tmp_path_factory.mktemp("radius-mariadb-credentials")
        (creds / "nas-secret").write_text(fr.das_secret)
        (creds / "radius-db").write_text(dsn)
        (creds / "radius-db-socket").write_text(f"mariadb://root@localhost/{name}?unix_socket={db.socket}")
        (creds / "bad-password").write_text(dsn.replace(f"{user}:", f"{user}:x"))
        (creds / "no-such-db").write_text(dsn.replace(f"/{name}", "/no_such_db"))
        (creds / "down").write_text(f"mysql://{user}:pw@127.0.0.1:{free_tcp_port()}/{name}")
        (creds / "garbled").write_text(f"mysql://{user}:pw@127.0.0.1:99999/{name}")
        try:
            context = DriverContext(device_timeout=5.0, credentials=CredentialStore(Path(creds)))
            yield Store(db, fr, dsn, context, Path(creds))
        finally:
            await asyncio.to_thread(fr.close)
    finally:
        await asyncio.to_thread(db.close)


@pytest.fixture
async def drv(store: Store) -> AsyncIterator[RadiusDriver]:
    driver = RadiusDriver(store.context)
    yield driver
    await driver.close()


async def test_off_writes_the_policy_freeradius_enforces_from_mariadb_and_on_lifts_it(
        store: Store, drv: RadiusDriver) -> None:
    user = await store.subscriber()
    assert await store.access(user) == "accept"
    assert await drv.read(store.device(), f"user/{user}") == "on"
    await drv.apply(store.device(), f"user/{user}", "off")
    assert await store.access(user) == "reject"  # rlm_sql_mysql reads the row the driver wrote
    assert await drv.read(store.device(), f"user/{user}") == "off"
    rows = await store.rows("SELECT groupname, priority FROM radusergroup WHERE username = {} ORDER BY priority", user)
    assert rows == [("suspended", 0), ("plan", 1)]
    await drv.apply(store.device(), f"user/{user}", "on")
    assert await store.access(user) == "accept"
    assert await drv.read(store.device(), f"user/{user}") == "on"


async def test_the_live_session_radacct_holds_is_ended_and_a_stale_one_closed(store: Store, drv: RadiusDriver) -> None:
    live, stale = await store.subscriber(), await store.subscriber()
    await store.fr.start_session(live, f"sess-{live}", "10.20.0.1")
    await store.fr.start_session(stale, f"sess-{stale}", "10.20.0.2")
    await store.fr.store_execute("DELETE FROM nas_sessions WHERE username = {}", stale)  # its Accounting-Stop lost
    for user in (live, stale):
        await drv.apply(store.device(), f"user/{user}", "off")
        assert await drv.read(store.device(), f"user/{user}") == "off"
    [sent] = [r.attributes for r in store.fr.das_requests() if r.attributes.get("User-Name") == live]
    assert sent["Acct-Session-Id"] == f"sess-{live}" and sent["Framed-IP-Address"] == "10.20.0.1"
    [(cause,)] = await store.rows("SELECT acctterminatecause FROM radacct WHERE username = {}", stale)
    assert cause == "Session-Context-Not-Found"


async def test_a_take_suspends_many_in_one_transaction_and_reads_them_in_one_go(
        store: Store, drv: RadiusDriver) -> None:
    users = [await store.subscriber() for _ in range(40)]
    device = store.device(max_parallel=8, timeout=10.0)
    found = await drv.apply_many(device, {f"user/{u}": "off" for u in users} | {"user/nobody@isp": "off"})
    assert {s for s, e in found.items() if e is None} == {f"user/{u}" for u in users}
    assert isinstance(found["user/nobody@isp"], PermanentError)
    states = await drv.read_many(device, [f"user/{u}" for u in users] + ["user/nobody@isp"])
    assert {states[f"user/{u}"] for u in users} == {"off"} and isinstance(states["user/nobody@isp"], PermanentError)
    assert await drv.apply_many(device, {f"user/{u}": "on" for u in users[:10]}) == {f"user/{u}": None
                                                                                     for u in users[:10]}
    assert [await store.access(u) for u in (users[0], users[20])] == ["accept", "reject"]


async def test_a_user_name_is_matched_as_mysql_compares_it(store: Store, drv: RadiusDriver) -> None:
    """MySQL's default collations ignore case, in FreeRADIUS's queries as in the driver's: Alice is alice."""
    user = await store.subscriber(f"Mixed{next(_ids)}@ISP")
    await drv.apply(store.device(), f"user/{user.lower()}", "off")
    assert await drv.read(store.device(), f"user/{user}") == "off"
    assert await store.access(user) == "reject"


async def test_a_unix_socket_dsn_works_too(store: Store, drv: RadiusDriver) -> None:
    user = await store.subscriber()
    device = store.device(policy_credential="radius-db-socket")
    await drv.probe(device)
    assert await drv.read(device, f"user/{user}") == "on"


@pytest.mark.parametrize("credential", ["bad-password", "no-such-db", "garbled"])
async def test_a_dsn_mariadb_refuses_is_a_config_error_naming_the_credential(
        store: Store, drv: RadiusDriver, credential: str) -> None:
    user = await store.subscriber()
    with pytest.raises(ConfigError, match=f"'{credential}'") as caught:
        await drv.read(store.device(policy_credential=credential), f"user/{user}")
    assert "pw-" not in str(caught.value) and ":x" not in str(caught.value)


async def test_a_store_that_is_down_is_unreachable(store: Store, drv: RadiusDriver) -> None:
    with pytest.raises(UnreachableError, match="'down'"):
        await drv.read(store.device(policy_credential="down"), "user/anyone")


async def test_device_test_checks_the_mariadb_store_and_the_nas(store: Store) -> None:
    good = await devicetest.run(store.device(), "nas-m", None, store.context)
    assert good.ok, devicetest.as_text(good)
    empty = await devicetest.run(store.device(suspended_group="nobody-defined-this"), "nas-m", None, store.context)
    probe = next(s for s in empty.steps if s.name == "probe")
    assert not probe.ok and probe.kind == "config" and "suspends nobody" in probe.detail


def documented_mysql_grants(user: str, database: str) -> list[str]:
    """The CREATE USER and GRANT statements docs/drivers.md gives for MySQL/MariaDB, for `user` on `database`."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "drivers.md").read_text()
    block = text[text.index("The same in MySQL/MariaDB"):]
    block = block[block.index("```sql") + 6:]
    block = block[:block.index("```")].replace("\n  ", " ")
    lines = [line.rstrip(";") for line in block.splitlines() if re.match(r"(CREATE USER|GRANT) ", line)]
    assert lines, "docs/drivers.md lost the MySQL grants"
    return [line.replace("'radius_agent'@'agent-host'", f"'{user}'@'127.0.0.1'").replace("radius.", f"`{database}`.")
            .replace("'…'", "'pw-agent-1'") for line in lines]


async def test_the_mysql_grants_the_docs_give_are_enough(store: Store, drv: RadiusDriver) -> None:
    database = store.dsn.rsplit("/", 1)[1]
    user = f"agent_{next(_ids)}"
    conn = store.db.root()
    try:
        with conn.cursor() as cur:
            for statement in documented_mysql_grants(user, database):
                cur.execute(statement)
    finally:
        conn.close()
    (store.creds / "agent-db").write_text(f"mysql://{user}:pw-agent-1@127.0.0.1:{store.db.port}/{database}")
    device = store.device(policy_credential="agent-db")
    live, stale = await store.subscriber(), await store.subscriber()
    await store.fr.start_session(live, f"sess-{live}", "10.21.0.1")
    await store.fr.start_session(stale, f"sess-{stale}", "10.21.0.2")
    await store.fr.store_execute("DELETE FROM nas_sessions WHERE username = {}", stale)
    await drv.probe(device)
    for u in (live, stale):
        await drv.apply(device, f"user/{u}", "off")
        assert await drv.read(device, f"user/{u}") == "off"
        await drv.apply(device, f"user/{u}", "on")
        assert await drv.read(device, f"user/{u}") == "on"
