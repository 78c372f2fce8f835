"""Fuzz: arbitrary JSON and bytes (non-finite numbers, NUL and control characters, deep nesting, huge
strings) thrown at the message parser, the report encoder and every driver's reply parsing. Each
either answers or raises one of our error kinds, with text that carries no raw control character."""

from __future__ import annotations

import json
import re
import sys

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.contract import parse_command
from agent.db.queries import Queries
from agent.drivers import http, routeros_proto, snmp_proto, ssh_proto
from agent.errors import AgentError
from agent.executor.reports import Delivery, EventRow, Outcome, StateUpdate, report_args

RAW_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f]")
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

text = st.one_of(st.text(), st.text(alphabet=st.characters(max_codepoint=0x9f)), st.just("\x00\x1b[2J\r\n"),
                 st.integers(1, 5).map(lambda n: "\x1bhuge\x00" * 10_000 * n))  # up to 500 KB
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
                    st.integers(min_value=10**300, max_value=10**400), text)
values = st.recursive(scalars, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                       st.dictionaries(text, kids, max_size=4)), max_leaves=30)


def deep(n: int) -> str:
    return "[" * n + "]" * n


def bodies() -> st.SearchStrategy[str]:
    command = st.fixed_dictionaries({"device": st.sampled_from(["r1", "r\x001", ""]), "service": text,
                                     "state": st.sampled_from(["on", "off", "x"])},
                                    optional={"meta": values, "request_id": text, "not_after": text})
    return st.one_of(values.map(lambda v: json.dumps(v, allow_nan=True)),
                     command.map(lambda v: json.dumps(v, allow_nan=True)),
                     st.integers(1, 3000).map(deep), st.binary().map(lambda b: b.decode("latin-1")))


def strings(doc: object) -> list[str]:
    if isinstance(doc, str):
        return [doc]
    if isinstance(doc, dict):
        return [*doc.keys(), *(t for v in doc.values() for t in strings(v))]
    if isinstance(doc, list):
        return [t for v in doc for t in strings(v)]
    return []


def safe(err: AgentError) -> None:
    assert not RAW_CONTROL.search(str(err).replace("\n", "")), repr(str(err))


@FUZZ
@given(raw=bodies())
def test_the_parser_answers_every_body_with_a_command_or_a_reason(raw):
    try:
        cmd = parse_command(raw)
    except AgentError as exc:
        assert str(exc)
        return
    assert cmd.device and cmd.service  # a command that passed is whole


@FUZZ
@given(error=text, meta=values, observed=text)
def test_the_report_encoder_never_produces_what_postgres_refuses(error, meta, observed):
    d = Delivery(1, 1, None, "{}", None, 1)  # type: ignore[arg-type]
    out = Outcome(d, "dead_letter", [EventRow("failed", "r1", "s", 1, 1, error=error, meta=meta if
                                              isinstance(meta, dict) else {"v": meta}, observed=observed)],
                  StateUpdate("r1", "s", error=error, meta={"v": meta}), reason=error, retry_delay=float("inf"))
    args = report_args(Queries("device_tasks"), "a", [out])
    for arg in args:
        if isinstance(arg, str) and arg.startswith(("[", "{")):
            doc = json.loads(arg, parse_constant=lambda c: (_ for _ in ()).throw(AssertionError(c)))
            assert not any("\x00" in t for t in strings(doc))  # jsonb refuses \u0000


@FUZZ
@given(status=st.integers(100, 599), body=text, doc=values)
def test_http_reply_parsing(status, body, doc):
    try:
        http.classify_status(status, "d: GET /x", body, body[:100])
    except AgentError as exc:
        safe(exc)
    value = http.resolve_pointer(doc, "/a/0")
    http.to_state(value, True, False)


@FUZZ
@given(doc=values, status=st.integers(100, 599), body=st.binary(max_size=2000))
def test_routeros_reply_parsing(doc, status, body):
    service = routeros_proto.parse_service("ppp/secret/alice")
    try:
        rows = routeros_proto.parse_rows(doc, "print")
        routeros_proto.state_of(service, {"ppp/secret": rows, "ppp/active": rows})
    except AgentError as exc:
        safe(exc)
    err = routeros_proto.classify(status, body, "r1: GET /rest/x", "user admin (credential r1)", None)
    if err is not None:
        safe(err)


snmp_values = st.one_of(st.integers(-(2**64), 2**64), st.binary(max_size=300),
                        st.builds(snmp_proto.Absent, st.sampled_from(["noSuchObject", "noSuchInstance"])),
                        st.builds(snmp_proto.Unexpected, text))


@FUZZ
@given(value=snmp_values, rows=st.lists(st.tuples(st.lists(st.integers(0, 2**32), max_size=14).map(tuple),
                                                  snmp_values), max_size=20))
def test_snmp_reply_parsing(value, rows):
    try:
        snmp_proto.to_state(value, "if:swp1")
    except AgentError as exc:
        safe(exc)
    snmp_proto.display(value)
    snmp_proto.column_rows((1, 3, 6, 1, 2, 1, 2, 2, 1, 2), rows)


@FUZZ
@given(exit_status=st.one_of(st.none(), st.integers(-300, 300)), out=st.binary(max_size=3000),
       err=st.binary(max_size=3000), truncated=st.booleans())
def test_ssh_reply_parsing(exit_status, out, err, truncated):
    opts = ssh_proto.parse_options({"username": "root", "host_key": "ssh-ed25519 AAAA", "on_command": "x",
                                    "off_command": "y", "status_command": "z", "on_pattern": "run",
                                    "off_pattern": "stop"}, "h:22", 5.0) \
        if exit_status is not None and exit_status % 2 else \
        ssh_proto.parse_options({"username": "root", "host_key": "ssh-ed25519 AAAA", "on_command": "x",
                                 "off_command": "y", "status_command": "z"}, "h:22", 5.0)
    result = ssh_proto.Result(exit_status, out, err, truncated)
    for check in (lambda: ssh_proto.state_of(opts, result, "h: status"),
                  lambda: ssh_proto.check_applied(opts, result, "h: on")):
        try:
            check()
        except AgentError as exc:
            safe(exc)


def test_nesting_deeper_than_the_interpreter_can_parse_is_a_reason_not_a_crash():
    depth = sys.getrecursionlimit() * 4
    try:
        parse_command(deep(depth))
    except AgentError as exc:
        assert str(exc)
