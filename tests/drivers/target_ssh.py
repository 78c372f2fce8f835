"""Contract target for `ssh`: a real OpenSSH sshd on loopback (tests/support/sshd.py), logging in as
root with a throwaway key. A service is a directory under the target's state directory; it is on
while the file `on` exists in it. The commands create and remove that file, and the suite observes
the file itself, not through the driver. A name without a directory is a missing object.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from agent.drivers.base import CredentialStore, DriverContext
from agent.model.device import Device
from tests.drivers.target import Target
from tests.support.slowserver import SlowServer, refusing_port
from tests.support.sshd import Sshd, keypair, public_line, sshd_available


def file_commands(state_dir: Path, listing: Path | None = None) -> dict[str, Any]:
    """Options whose commands toggle `<state_dir>/<service>/on`; exit 4 names a missing service. With a
    `listing`, the status command prints it first, as a router's status commands print whole tables."""
    d = str(state_dir)
    exists = f'test -d {d}/{{service}} || {{ echo "no such service: "{{service}} >&2; exit 4; }}; '
    show = f"cat {listing}; " if listing is not None else ""
    return {"on_command": exists + f"touch {d}/{{service}}/on",
            "off_command": exists + f"rm -f {d}/{{service}}/on",
            "status_command": exists + show + f"test -e {d}/{{service}}/on",
            "status_off_exit": 1, "probe_command": "true"}


@contextlib.asynccontextmanager
async def target(tmp_path: Path) -> AsyncIterator[Target]:
    if (why := sshd_available()) is not None:
        import pytest
        pytest.skip(why)
    creds = tmp_path / "credentials"
    creds.mkdir()
    key = keypair(creds / "box-key")
    keypair(creds / "box-wrong-key")
    state = tmp_path / "state"
    (state / "alice").mkdir(parents=True)
    bulk = [f"cust-{n:02d}" for n in range(5)]  # one command each: a few show the reads are right
    for n, name in enumerate(bulk):
        (state / name).mkdir()
        if n % 3 == 0:
            (state / name / "on").touch()
    sshd = await asyncio.to_thread(Sshd(tmp_path / "sshd", [public_line(key)]).start)
    slow = await SlowServer().start()
    listing = tmp_path / "listing"  # ~50 KB, under the driver's 64 KiB max_output_bytes: many segments on a WAN
    listing.write_text("".join(f"{n:5d}: customer-{n:05d} pppoe 10.64.{n // 250}.{n % 250} up\n" for n in range(1200)))
    options = {"username": "root", "host_key": sshd.host_key_line, "timeout": 5.0,
               **file_commands(state, listing)}

    async def observe(service: str) -> str:
        return "on" if (state / service / "on").exists() else "off"

    def device(address: str, credential: str = "box-key", timeout: float = 5.0) -> Device:
        return Device("box", "ssh", address, options={**options, "timeout": timeout}, credential=credential)

    secrets = [text for name in ("box-key", "box-wrong-key")
               for text in [(creds / name).read_text().strip(), (creds / name).read_text().splitlines()[2]]]
    try:
        with refusing_port() as closed:
            yield Target(
                driver="ssh",
                context=DriverContext(device_timeout=5.0, credentials=CredentialStore(creds)),
                device=device(sshd.address),
                service="alice",
                missing_service="nobody",
                invalid_service="../alice",
                unreachable=device(f"127.0.0.1:{closed}"),
                slow=device(f"127.0.0.1:{slow.port}", timeout=1.0),
                secrets=secrets,
                observe=observe,
                bad_credential=device(sshd.address, "box-wrong-key"),
                transport="tcp",
                bulk=bulk,
            )
    finally:
        await slow.stop()
        await asyncio.to_thread(sshd.stop)
