"""Contract target for `snmp`: real net-snmp snmpd managing veth ports in a namespace the test makes
(tests/support/snmpd.py). The device speaks SNMPv3 authPriv, so a wrong key is refused with a
report the driver can tell apart from silence; the suite observes a port's real UP flag with `ip`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

from agent.drivers.base import CredentialStore, DriverContext
from agent.model.device import Device
from tests.drivers.target import Target
from tests.support.snmpd import Snmpd, V3User, closed_udp_port, silent_udp, snmpd_available

AUTH, PRIV, WRONG = "authKey-Contract-4e1f", "privKey-Contract-9a2c", "authKey-Wrong-77d0"
V3 = {"version": "3", "user": "ops", "auth_protocol": "sha", "priv_protocol": "aes", "timeout": 3.0}
UDP_NOTE = ("SNMP runs over UDP: a device that is down, a closed port and a wrong v2c community all look "
            "the same (no answer), so an unreachable device is a NoAnswerError after the timeout, never "
            "an UnreachableError")


@contextlib.asynccontextmanager
async def target(tmp_path: Path) -> AsyncIterator[Target]:
    if (why := snmpd_available()) is not None:
        import pytest
        pytest.skip(why)
    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / "sw-v3").write_text(json.dumps({"auth_key": AUTH, "priv_key": PRIV}))
    (creds / "sw-wrong").write_text(json.dumps({"auth_key": WRONG, "priv_key": PRIV}))
    # a 48-port access switch: reading every port is many datagrams' worth through the WAN link's relay
    ports = [f"swp{i}" for i in range(1, 49)]
    snmpd = await asyncio.to_thread(Snmpd, ports=ports, users=[V3User("ops", AUTH, PRIV)])

    async def observe(service: str) -> str:
        return "on" if snmpd.is_up(service.removeprefix("if:")) else "off"

    def device(address: str, credential: str = "sw-v3", timeout: float = 3.0) -> Device:
        return Device("switch-1", "snmp", address, options={**V3, "timeout": timeout}, credential=credential)

    try:
        with silent_udp() as slow:
            yield Target(
                driver="snmp",
                context=DriverContext(device_timeout=5.0, credentials=CredentialStore(creds)),
                device=device(snmpd.address),
                service="if:swp1",
                missing_service="if:swp99",
                invalid_service="port:1",
                unreachable=device(f"127.0.0.1:{closed_udp_port()}", timeout=1.0),
                slow=device(f"127.0.0.1:{slow}", timeout=1.0),
                secrets=[AUTH, PRIV, WRONG, snmpd.write_community],
                observe=observe,
                bad_credential=device(snmpd.address, "sw-wrong"),
                notes={"unreachable": UDP_NOTE},
                transport="udp",
                bulk=[f"if:{p}" for p in ports],
            )
    finally:
        await asyncio.to_thread(snmpd.close)
