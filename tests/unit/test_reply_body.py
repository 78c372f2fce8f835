"""A device's reply is read whole however it arrives, and refused clearly when it is too long.

Through a VPN a reply of a few KB arrives in several segments; the http driver once kept only the
first of them, and a list read of thousands of PPP secrets was "not JSON".
"""

from __future__ import annotations

import asyncio
import json

import pytest
from aiohttp import web

from agent.drivers.base import DriverContext
from agent.drivers.body import read_capped
from agent.drivers.http import HttpDriver
from agent.errors import PermanentError, TransientError
from agent.model.device import Device
from tests.support.httpdevice import HttpDevice
from tests.support.wan import TcpProxy

LISTED = {"read_path": "/rest/ppp/secret/{service}", "list_path": "/rest/ppp/secret", "state_pointer": "/disabled",
          "on_value": "false", "off_value": "true", "timeout": 5.0}
NAMES = [f"customer-{n:05d}" for n in range(3000)]


@pytest.fixture
async def box():
    dev = await HttpDevice().start()
    dev.secrets = {name: "true" if n % 3 == 0 else "false" for n, name in enumerate(NAMES)}
    yield dev
    await dev.stop()


@pytest.fixture
async def driver():
    d = HttpDriver(DriverContext(device_timeout=5))
    yield d
    await d.close()


async def test_a_list_of_thousands_of_secrets_arriving_in_segments_is_read_whole(box, driver):
    async with TcpProxy(("127.0.0.1", box.port), latency=0.005, segment=1380, gap=0.0005) as wan:
        got = await driver.read_many(Device("r1", "http", wan.address, options=LISTED), NAMES)
    assert len(wan.segments) > 100, "the reply (~500 KB) crossed the link in MTU-sized segments"
    assert got == {name: "off" if n % 3 == 0 else "on" for n, name in enumerate(NAMES)}


async def test_a_reply_over_the_limit_is_refused_naming_the_limit_even_without_a_declared_length(driver):
    async def endless(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()  # chunked: no Content-Length to refuse it by
        await resp.prepare(request)
        for _ in range(100):
            await resp.write(b'[' + b'{"name": "x", "disabled": "false"},' * 100)
        return resp

    app = web.Application()
    app.router.add_get("/rest/ppp/secret", endless)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        async with TcpProxy(runner.addresses[0][:2], latency=0.0, gap=0.0) as wan:
            dev = Device("r1", "http", wan.address, options={**LISTED, "max_reply_bytes": 65536})
            with pytest.raises(PermanentError, match=r"over the 65536-byte limit \(max_reply_bytes\)"):
                await driver.read_many(dev, ["x"])
    finally:
        await runner.cleanup()


async def test_a_declared_length_over_the_limit_is_refused_before_reading(box, driver):
    dev = Device("r1", "http", f"127.0.0.1:{box.port}", options={**LISTED, "max_reply_bytes": 4096})
    with pytest.raises(PermanentError, match=r"reply of \d+ bytes is over the 4096-byte limit \(max_reply_bytes\)"):
        await driver.read_many(dev, NAMES[:2])


async def test_a_reply_cut_by_a_reset_is_a_transient_failure_not_a_bad_reply(box, driver):
    async with TcpProxy(("127.0.0.1", box.port), latency=0.0, gap=0.0, reset_after=20000) as wan:
        with pytest.raises(TransientError):
            await driver.read_many(Device("r1", "http", wan.address, options=LISTED), NAMES)
    assert wan.resets == 1


async def test_the_capped_reader_reads_every_piece_and_stops_past_the_limit():
    stream = asyncio.StreamReader()  # aiohttp's StreamReader.read(n) has the same contract
    pieces = [json.dumps(NAMES).encode()[i:i + 1380] for i in range(0, len(json.dumps(NAMES)), 1380)]

    async def feed(reader: asyncio.StreamReader) -> None:
        for piece in pieces:
            reader.feed_data(piece)
            await asyncio.sleep(0)
        reader.feed_eof()

    feeder = asyncio.create_task(feed(stream))
    assert json.loads(await read_capped(stream, 1 << 20)) == NAMES  # type: ignore[arg-type]
    await feeder
    small = asyncio.StreamReader()
    feeder = asyncio.create_task(feed(small))
    assert await read_capped(small, 10000) is None  # type: ignore[arg-type]
    feeder.cancel()
