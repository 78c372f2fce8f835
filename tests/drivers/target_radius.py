"""Contract target for `radius`: real FreeRADIUS 3.2 (tests/support/freeradius.py) with rlm_sql on a
throwaway Postgres in FreeRADIUS's own schema; it is also the NAS's Dynamic Authorization Server. The suite
observes a subscriber's real state by asking FreeRADIUS itself: an Access-Request accepted is on, rejected off.

A read goes to the policy store only (the NAS has nothing to read), so the unreachable and slow devices are
unreachable and slow on both halves: the store's DSN names a refusing port or a server that never answers,
and so does the NAS address. Likewise the wrong-credential device's policy credential names a role the
store refuses, besides a wrong shared secret (which the NAS drops without a word: a read does not reach the NAS, so
test_radius.py covers that half, against FreeRADIUS's DAS).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from agent.drivers.base import CredentialStore, DriverContext
from agent.model.device import Device
from tests.drivers.target import Target
from tests.support.freeradius import NAS_IP, FreeRadius, add_user, add_users, create_store, freeradius_available
from tests.support.pg import create_database, drop_database, start_cluster
from tests.support.slowserver import SlowServer, refusing_port
from tests.support.snmpd import closed_udp_port, silent_udp

WRONG = "wrong-Secret-5c2e"
BULK = 300  # subscribers of one NAS read at once, a third of them suspended
UDP_NOTE = ("RADIUS Dynamic Authorization runs over UDP: a NAS that is down is silent (NoAnswerError); one whose "
            "host answers a TCP connection but whose DAS drops the requests (another secret) is a ConfigError; a "
            "closed port (ICMP) is an UnreachableError")


@contextlib.asynccontextmanager
async def target(tmp_path: Path) -> AsyncIterator[Target]:
    if (why := freeradius_available()) is not None:
        import pytest
        pytest.skip(why)
    admin, cluster = await asyncio.to_thread(start_cluster)
    dsn = await create_database(admin)
    await create_store(dsn)
    await add_user(dsn, "contract-sub", "pw-contract")
    bulk = [f"bulk-{i}@isp" for i in range(BULK)]
    await add_users(dsn, bulk, "pw-contract", suspended=set(bulk[::3]))
    fr = await asyncio.to_thread(FreeRadius, dsn)
    slow = await SlowServer().start()
    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / "nas-secret").write_text(fr.das_secret)
    (creds / "nas-wrong").write_text(WRONG)
    (creds / "radius-db").write_text(dsn)
    (creds / "radius-db-wrong").write_text(dsn.replace("postgresql://postgres", "postgresql://no_such_role"))
    (creds / "radius-db-slow").write_text(f"postgresql://postgres@127.0.0.1:{slow.port}/radius")

    async def observe(service: str) -> str:
        return "on" if await fr.access(service.removeprefix("user/"), "pw-contract") == "accept" else "off"

    def device(address: str, credential: str = "nas-secret", store: str = "radius-db", timeout: float = 3.0) -> Device:
        options = {"policy_credential": store, "nas_ip": NAS_IP, "timeout": timeout, "settle": 2.0}
        return Device("nas-1", "radius", address, options=options, credential=credential)

    try:
        with refusing_port() as refused, silent_udp() as silent:
            (creds / "radius-db-down").write_text(f"postgresql://postgres@127.0.0.1:{refused}/radius")
            yield Target(
                driver="radius",
                context=DriverContext(device_timeout=5.0, credentials=CredentialStore(creds)),
                device=device(fr.das_address),
                service="user/contract-sub",
                missing_service="user/no-such-subscriber",
                invalid_service="port:1",
                unreachable=device(f"127.0.0.1:{closed_udp_port()}", store="radius-db-down", timeout=1.0),
                slow=device(f"127.0.0.1:{silent}", store="radius-db-slow", timeout=1.0),
                secrets=[fr.das_secret, WRONG],
                observe=observe,
                bad_credential=device(fr.das_address, "nas-wrong", "radius-db-wrong"),
                notes={"unreachable": UDP_NOTE},
                transport="udp",
                bulk=[f"user/{name}" for name in bulk],
            )
    finally:
        await slow.stop()
        await asyncio.to_thread(fr.close)
        if cluster is not None:
            await asyncio.to_thread(cluster.close)
        else:
            await drop_database(admin, dsn)
