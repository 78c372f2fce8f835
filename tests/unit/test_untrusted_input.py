"""Pure parts of hardening: untrusted text and numbers made safe, headers validated, backoffs capped,
log lines that cannot be forged, host names resolved without blocking."""

from __future__ import annotations

import asyncio
import json
import logging
import math

import pytest

from agent.contract import parse_command
from agent.errors import PermanentError
from agent.executor.policy import ParkPolicy, RetryPolicy
from agent.log import PlainFormatter
from agent.queue.admission import admit, header_problem
from agent.text import clean, safe_json, strict_json
from agent.vpn.resolve import HostResolver, address_host


def test_clean_escapes_every_control_character_and_bounds_the_length():
    assert clean("a\nb\rc\x00d\x1b[31me\u202ef") == "a\\nb\\rc\\x00d\\x1b[31me\\u202ef"
    assert clean("x" * 1000, 10) == "x" * 10 + "…"
    assert clean("tab\tstays") == "tab\tstays"


def test_safe_json_has_no_non_finite_numbers_and_no_nul():
    doc = safe_json({"a": math.inf, "b": [math.nan, "x\x00y"], "c": {"d": -math.inf}})
    assert json.dumps(doc, allow_nan=False) == '{"a": null, "b": [null, "x\\\\u0000y"], "c": {"d": null}}'


def test_strict_json_is_json_that_jsonb_takes_whatever_the_value():
    assert json.loads(strict_json({"a": math.inf, "b": [math.nan, "x\x00y"], "c": {"d": -math.inf}})) == {
        "a": None, "b": [None, "x\\u0000y"], "c": {"d": None}}  # as safe_json: null, and NUL as text
    # what the fast encoder cannot take goes the slow way, still whole
    assert json.loads(strict_json({"n": 2**70, 1: "key"})) == {"n": 2**70, "1": "key"}
    assert "\\udcff" in strict_json(["\udcff"])  # a lone surrogate: as json.dumps escapes it
    doc = [["r1", "pppoe:müller"], [1.5, 1764756000.123456, None, True], [{"plan": "home 50"}]]
    assert json.loads(strict_json(doc)) == doc


@pytest.mark.parametrize("meta", ['{"x": 1%s.5}' % ("0" * 400), '{"x": [NaN]}', '{"x": -Infinity}'])
def test_a_command_with_a_non_finite_number_is_refused_at_parse(meta):
    with pytest.raises(PermanentError, match="not finite"):
        parse_command('{"device": "r1", "service": "s", "state": "on", "meta": ' + meta + '}')


def test_a_request_id_with_control_characters_is_refused_at_parse():
    with pytest.raises(PermanentError, match=r"request_id: .*control characters"):
        parse_command(json.dumps({"device": "r1", "service": "s", "state": "on", "request_id": "a\nb"}))


@pytest.mark.parametrize(("headers", "problem"), [
    ('{"bounces": "lots"}', "bounces must be"),
    ('{"bounces": -1}', "bounces must be"),
    ('{"origin_msg_id": 99}', "origin_msg_id must be"),
    ('{"origin_msg_id": true}', "origin_msg_id must be"),
    ("[1, 2]", "must be a JSON object"),
    ('{"bounces": 3, "origin_msg_id": 5, "trace": "producer key"}', None),
    (None, None),
])
def test_the_agents_own_headers_are_validated_like_a_command(headers, problem):
    found = header_problem(10, headers)
    assert (found is None) if problem is None else (problem in found)


def row(**kw):  # a read row, as the read query returns it
    base = {"msg_id": 5, "read_ct": 1, "message": "{}", "size": 2, "headers": None, "headers_size": None,
            "last_id": 5}
    return base | kw


def test_admission_refuses_oversized_bodies_and_forged_ids():
    with pytest.raises(PermanentError, match="not fetched"):
        admit(row(message=None, size=10_000_000), 65536)
    with pytest.raises(PermanentError, match="not a real queue id"):
        admit(row(msg_id=9_000_000_000_000_000_000, last_id=7), 65536)
    admit(row(), 65536)


def test_backoffs_are_capped_before_the_power_so_they_never_overflow():
    assert ParkPolicy(cap=60).delay(10**6) <= 60
    assert RetryPolicy(cap=300).delay(10**6) <= 300


def test_a_log_line_cannot_be_forged_and_carries_no_terminal_escapes():
    record = logging.LogRecord("agent", logging.INFO, __file__, 1, "verified %s", ("\x1b[2Jx",), None)
    record.action, record.request_id = "verified", "pay-1\n12:00:00.000 INFO    verified       forged"
    line = PlainFormatter().format(record)
    assert "\n" not in line and "\x1b" not in line and "pay-1\\n12:00:00.000" in line


def test_address_host_takes_the_host_of_every_address_form():
    assert [address_host(a) for a in ("10.0.0.1", "r1.example:8443", "https://[fd00::1]:443/x", "", None)] == \
        ["10.0.0.1", "r1.example", "fd00::1", None, None]


async def test_names_resolve_in_the_background_within_a_deadline_and_follow_changes():
    answers = {"r1.lan": "10.0.0.1"}
    stuck = asyncio.Event()

    async def lookup(name: str) -> list:  # the resolver's only I/O, answered from `answers`; one name hangs
        if name == "hangs.lan":
            await stuck.wait()
        if name not in answers:
            raise OSError("no such name")
        return [(0, 0, 0, "", (answers[name], 0))]

    changed = asyncio.Event()
    resolver = HostResolver(ttl=0.0, timeout=0.2, on_change=changed.set, lookup=lookup)
    assert resolver.cached("r1.lan") is None  # never waits: unknown until resolved
    assert resolver.cached("192.0.2.7:80") == "192.0.2.7"
    await resolver.refresh(["r1.lan", "hangs.lan", "gone.lan"])
    assert (resolver.cached("r1.lan"), resolver.cached("hangs.lan"), resolver.cached("gone.lan")) == \
        ("10.0.0.1", None, None)
    answers["r1.lan"] = "10.0.0.2"  # the device's DNS record changed
    assert resolver.stale(["r1.lan"]) == ["r1.lan"]  # ttl 0: expired at once
    changed.clear()
    await resolver.refresh(resolver.stale(["r1.lan"]))
    assert resolver.cached("r1.lan") == "10.0.0.2" and changed.is_set()
