"""The pure part of the `routeros` driver: service keys, requests, replies, plans, error mapping.

Transcripts are taken from MikroTik's REST API help page (help.mikrotik.com, "REST API").
"""

from __future__ import annotations

import json

import aiohttp
import pytest

from agent.drivers.routeros import parse_base, parse_fingerprint, settings, transport_error
from agent.drivers.routeros_proto import (
    LIST6_MENU,
    LIST_MENU,
    Request,
    any_of,
    any_pair,
    canonical_address,
    classify,
    parse_rows,
    parse_service,
    plan,
    policy_reads,
    print_request,
    reads_for,
    state_of,
    unused_lists,
)
from agent.errors import ConfigError, NoAnswerError, PermanentError, TransientError
from agent.model.device import Device

COMMENT = "managed by pgmq-edge-agent"

# GET https://10.155.101.214/rest/ip/address (the documentation's first GET example)
DOC_ADDRESSES = (b'[{".id":"*1","actual-interface":"ether2","address":"10.0.0.111/24","disabled":"false",'
                 b'"dynamic":"false","interface":"ether2","invalid":"false","network":"10.0.0.0"},'
                 b'{".id":"*2","actual-interface":"ether3","address":"10.0.0.109/24","disabled":"true",'
                 b'"dynamic":"false","interface":"ether3","invalid":"false","network":"10.0.0.0"}]')


def replies(**tables: list[dict[str, str]]) -> dict[str, list[dict[str, str]]]:
    base = {"ppp/secret": [], "ppp/active": [], "ip/hotspot/user": [], "ip/hotspot/active": [],
            "interface": [], "queue/simple": [], LIST_MENU: [], LIST6_MENU: []}
    return base | {k.replace("__", "/").replace("_", "-"): v for k, v in tables.items()}


# -- service keys ---------------------------------------------------------------------------

@pytest.mark.parametrize(("key", "menu", "name", "lst"), [
    ("ppp/secret/alice@isp", "ppp/secret", "alice@isp", ""),
    ("ip/hotspot/user/room 12", "ip/hotspot/user", "room 12", ""),
    ("interface/ether5", "interface", "ether5", ""),
    ("queue/simple/cust-42", "queue/simple", "cust-42", ""),
    ("ip/firewall/address-list/blocked/10.1.2.3", None, "10.1.2.3", "blocked"),
    ("ip/firewall/address-list/blocked/10.9.0.0/24", None, "10.9.0.0/24", "blocked"),
    ("ip/firewall/address-list/v6/2001:db8::1", None, "2001:db8::1/128", "v6"),
])
def test_service_keys_name_the_menu_and_item(key: str, menu: str | None, name: str, lst: str) -> None:
    svc = parse_service(key)
    assert (svc.kind.menu if svc.kind else None, svc.name, svc.list) == (menu, name, lst)


@pytest.mark.parametrize("key", ["alice", "ppp/secret/", "ppp/secrets/alice", "ip/firewall/filter/x",
                                 "ppp/secret/a\nb", "ip/firewall/address-list/blocked/", "interface/" + "x" * 256,
                                 "ip/firewall/address-list/blocked/10.0.0.1 ; x", "ip/firewall/address-list//10.0.0.1"])
def test_bad_service_keys_are_permanent_errors_that_say_the_syntax(key: str) -> None:
    with pytest.raises(PermanentError, match="ppp/secret/<name>"):
        parse_service(key)


# -- requests -------------------------------------------------------------------------------

def test_print_request_has_the_documented_shape() -> None:
    # curl -X POST .../rest/ip/address/print --data '{".proplist": [".id","address","interface"],
    #   ".query": ["network=192.168.111.111","dynamic=true","#|"]}'
    query = ["network=192.168.111.111", "dynamic=true", "#|"]
    req = print_request("ip/address", [".id", "address", "interface"], query)
    assert req == Request("POST", "/rest/ip/address/print", json.loads(
        '{".proplist": [".id","address","interface"], ".query": ["network=192.168.111.111","dynamic=true","#|"]}'))


def test_one_name_is_a_plain_query_and_many_are_ored_on_the_stack() -> None:
    assert any_of("name", ["alice"]) == ["name=alice"]
    assert any_of("name", ["a", "b", "c"]) == ["name=a", "name=b", "name=c", "#||"]
    assert any_pair([("blocked", "10.0.0.1"), ("late", "10.0.0.2")]) == [
        "list=blocked", "address=10.0.0.1", "#&", "list=late", "address=10.0.0.2", "#&", "#|"]


def test_many_services_need_one_print_per_menu() -> None:
    services = [parse_service(k) for k in ("ppp/secret/a", "ppp/secret/b", "ppp/secret/a", "interface/ether2",
                                           "ip/firewall/address-list/x/10.0.0.1")]
    reads = reads_for(services)
    assert sorted(reads) == ["interface", LIST_MENU, "ppp/active", "ppp/secret"]
    assert reads["ppp/secret"].body[".query"] == ["name=a", "name=b", "#|"]
    assert reads["ppp/active"].body == {".proplist": [".id", "name"], ".query": ["name=a", "name=b", "#|"]}
    hotspot = reads_for([parse_service("ip/hotspot/user/u1")])
    assert hotspot["ip/hotspot/active"].body[".query"] == ["user=u1"]


# -- replies --------------------------------------------------------------------------------

def test_documented_print_reply_parses_with_string_values() -> None:
    rows = parse_rows(json.loads(DOC_ADDRESSES), "what")
    assert [r["disabled"] for r in rows] == ["false", "true"]


@pytest.mark.parametrize("doc", [{"name": "x"}, [{"disabled": False}], [{".id": "1"}], [{".id": "*1; rm"}], ["x"]])
def test_replies_that_are_not_routeros_shaped_are_permanent_errors(doc: object) -> None:
    with pytest.raises(PermanentError, match="what"):
        parse_rows(doc, "what")


def test_secret_state_counts_the_live_session() -> None:
    svc = parse_service("ppp/secret/alice")
    secret = {".id": "*1A", "name": "alice", "disabled": "true"}
    session = {".id": "*9", "name": "alice"}
    assert state_of(svc, replies(ppp__secret=[secret])) == "off"
    assert state_of(svc, replies(ppp__secret=[secret], ppp__active=[session])) == "on"
    assert state_of(svc, replies(ppp__secret=[secret | {"disabled": "false"}])) == "on"
    assert state_of(svc, replies(ppp__secret=[secret | {"disabled": "yes"}])) == "off"


def test_missing_or_duplicate_item_is_permanent_and_named() -> None:
    svc = parse_service("queue/simple/cust-7")
    with pytest.raises(PermanentError, match="no queue/simple item named 'cust-7'"):
        state_of(svc, replies(queue__simple=[{".id": "*1", "name": "cust-8", "disabled": "false"}]))
    twins = [{".id": "*1", "name": "cust-7", "disabled": "false"}, {".id": "*2", "name": "cust-7", "disabled": "true"}]
    with pytest.raises(PermanentError, match="2 items"):
        plan(svc, replies(queue__simple=twins), "off", COMMENT, False)
    with pytest.raises(PermanentError, match="neither true nor false"):
        state_of(svc, replies(queue__simple=[{".id": "*1", "name": "cust-7", "disabled": "maybe\x1b"}]))


# -- plans ----------------------------------------------------------------------------------

def test_off_disables_the_secret_and_ends_every_session() -> None:
    svc = parse_service("ppp/secret/alice")
    now = replies(ppp__secret=[{".id": "*1A", "name": "alice", "disabled": "false"}],
                  ppp__active=[{".id": "*5", "name": "alice"}, {".id": "*6", "name": "alice"}])
    assert plan(svc, now, "off", COMMENT, False) == [
        Request("PATCH", "/rest/ppp/secret/*1A", {"disabled": "yes"}),
        Request("DELETE", "/rest/ppp/active/*5", missing_ok=True),
        Request("DELETE", "/rest/ppp/active/*6", missing_ok=True)]


def test_on_enables_only_when_disabled_and_a_done_off_needs_nothing() -> None:
    svc = parse_service("ip/hotspot/user/u1")
    disabled = replies(ip__hotspot__user=[{".id": "*3", "name": "u1", "disabled": "true"}])
    assert plan(svc, disabled, "on", COMMENT, False) == [Request("PATCH", "/rest/ip/hotspot/user/*3",
                                                                 {"disabled": "no"})]
    assert plan(svc, disabled, "off", COMMENT, False) == []
    enabled = replies(ip__hotspot__user=[{".id": "*3", "name": "u1", "disabled": "false"}])
    assert plan(svc, enabled, "on", COMMENT, False) == []


def entry(id_: str, comment: str | None = None, disabled: str = "false") -> dict[str, str]:
    row = {".id": id_, "list": "blocked", "address": "10.0.0.7", "disabled": disabled}
    return row | ({"comment": comment} if comment is not None else {})


def test_address_list_off_adds_a_marked_entry_unless_one_is_enabled() -> None:
    svc = parse_service("ip/firewall/address-list/blocked/10.0.0.7")
    assert state_of(svc, replies()) == "on"
    assert plan(svc, replies(), "off", COMMENT, False) == [
        Request("PUT", f"/rest/{LIST_MENU}", {"list": "blocked", "address": "10.0.0.7", "comment": COMMENT})]
    foreign = replies(ip__firewall__address_list=[entry("*7", "operator")])
    assert state_of(svc, foreign) == "off" and plan(svc, foreign, "off", COMMENT, False) == []
    ours_disabled = replies(ip__firewall__address_list=[entry("*8", COMMENT, "true")])
    assert state_of(svc, ours_disabled) == "on"
    assert plan(svc, ours_disabled, "off", COMMENT, False) == [
        Request("PATCH", f"/rest/{LIST_MENU}/*8", {"disabled": "no"})]


def test_address_list_on_removes_only_the_agents_entries() -> None:
    svc = parse_service("ip/firewall/address-list/blocked/10.0.0.7")
    other_list = entry("*9", COMMENT) | {"list": "other"}
    both = replies(ip__firewall__address_list=[entry("*7", "operator"), entry("*8", COMMENT), other_list])
    with pytest.raises(PermanentError, match="manage_foreign_entries"):
        plan(svc, both, "on", COMMENT, False)
    assert plan(svc, both, "on", COMMENT, True) == [Request("DELETE", f"/rest/{LIST_MENU}/*8"),
                                                   Request("DELETE", f"/rest/{LIST_MENU}/*7")]
    ours = replies(ip__firewall__address_list=[entry("*8", COMMENT), entry("*6", "operator", "true")])
    assert plan(svc, ours, "on", COMMENT, False) == [Request("DELETE", f"/rest/{LIST_MENU}/*8")]


def test_an_operators_disabled_entry_is_borrowed_for_off_and_given_back_on() -> None:
    # RouterOS refuses a second entry for the same list and address, even beside a disabled one
    svc = parse_service("ip/firewall/address-list/blocked/10.0.0.7")
    theirs = replies(ip__firewall__address_list=[entry("*6", "late payer 2024", "true")])
    assert plan(svc, theirs, "off", COMMENT, False) == [
        Request("PATCH", f"/rest/{LIST_MENU}/*6", {"disabled": "no", "comment": f"late payer 2024 [{COMMENT}]"})]
    lent = replies(ip__firewall__address_list=[entry("*6", f"late payer 2024 [{COMMENT}]")])
    assert state_of(svc, lent) == "off" and plan(svc, lent, "off", COMMENT, False) == []
    assert plan(svc, lent, "on", COMMENT, False) == [
        Request("PATCH", f"/rest/{LIST_MENU}/*6", {"disabled": "yes", "comment": "late payer 2024"})]
    bare = replies(ip__firewall__address_list=[entry("*6", None, "true")])
    assert plan(svc, bare, "off", COMMENT, False)[0].body == {"disabled": "no", "comment": f"[{COMMENT}]"}


@pytest.mark.parametrize(("given", "stored", "v6"), [
    ("10.0.0.7", "10.0.0.7", False),
    ("10.0.0.7/32", "10.0.0.7", False),
    ("10.9.0.0/24", "10.9.0.0/24", False),
    ("10.0.0.1-10.0.0.9", "10.0.0.1-10.0.0.9", False),
    ("2001:DB8:0:0::1", "2001:db8::1/128", True),
    ("2001:db8::1/128", "2001:db8::1/128", True),
    ("2001:0db8:0001::/48", "2001:db8:1::/48", True),
    ("Portal.Example.COM", "portal.example.com", None),
])
def test_addresses_are_canonical_as_routeros_prints_them(given: str, stored: str, v6: bool | None) -> None:
    assert canonical_address(given) == (stored, v6)


def test_ipv6_entries_live_in_the_ipv6_menu_under_either_key() -> None:
    for key in ("ip/firewall/address-list/blocked/2001:DB8::7", "ipv6/firewall/address-list/blocked/2001:db8::7"):
        svc = parse_service(key)
        assert (svc.menu, svc.name, svc.list) == (LIST6_MENU, "2001:db8::7/128", "blocked")
    assert parse_service("ip/firewall/address-list/blocked/10.0.0.7/32").menu == LIST_MENU
    with pytest.raises(PermanentError, match="belongs in ip/firewall/address-list"):
        parse_service("ipv6/firewall/address-list/blocked/10.0.0.7")
    for bad in ("ip/firewall/address-list/blocked/10.0.0.300", "ip/firewall/address-list/blocked/10.0.0.9-10.0.0.1",
                "ip/firewall/address-list/blocked/10.9.0.5/24"):
        with pytest.raises(PermanentError):
            parse_service(bad)
    reads = reads_for([parse_service("ip/firewall/address-list/b/10.0.0.7"),
                       parse_service("ip/firewall/address-list/b/2001:db8::7")])
    assert reads[LIST6_MENU].path == f"/rest/{LIST6_MENU}/print"
    assert reads[LIST6_MENU].body[".query"] == ["list=b", "address=2001:db8::7/128", "#&"]
    assert reads[LIST_MENU].body[".query"] == ["list=b", "address=10.0.0.7", "#&"]


def test_an_entry_printed_in_another_spelling_is_still_found() -> None:
    svc = parse_service("ip/firewall/address-list/blocked/2001:db8::7")
    row = {".id": "*1", "list": "blocked", "address": "2001:DB8:0::7", "disabled": "false"}
    assert state_of(svc, replies(ipv6__firewall__address_list=[row])) == "off"


# -- the suspension-policy check -------------------------------------------------------------

def test_an_ipv6_list_is_looked_for_in_every_ipv6_rule_table_nat_only_where_the_release_has_it() -> None:
    reads = policy_reads([(LIST6_MENU, "portal6")])
    assert sorted(reads) == ["ipv6/firewall/filter", "ipv6/firewall/mangle", "ipv6/firewall/nat", "ipv6/firewall/raw"]
    assert [t for t, r in reads.items() if r.absent_ok] == ["ipv6/firewall/nat"]  # v6 has no IPv6 NAT
    assert not any(r.absent_ok for r in policy_reads([(LIST_MENU, "blocked")]).values())
    nat = {"ipv6/firewall/nat": [{"src-address-list": "portal6", "disabled": "false"}]}
    assert unused_lists([(LIST6_MENU, "portal6")], nat) == []
    [problem] = unused_lists([(LIST6_MENU, "portal6")], {"ipv6/firewall/nat": [{"src-address-list": "portal6",
                                                                                "disabled": "true"}]})
    assert "'portal6'" in problem


def test_a_menu_the_release_lacks_reads_as_no_rules_only_where_that_is_allowed() -> None:
    from agent.drivers.routeros import RouterOsDriver
    s = settings(Device("r", "routeros", "https://10.0.0.1", options={"username": "a"}, credential="c"), 3.0)
    lacking = b'{"error":400,"message":"Bad Request","detail":"no such command or directory (nat)"}'
    optional = policy_reads([(LIST6_MENU, "portal6")])["ipv6/firewall/nat"]
    assert RouterOsDriver()._reply(optional, 400, None, lacking, "w", s) == []
    with pytest.raises(PermanentError, match="no such command"):
        RouterOsDriver()._reply(policy_reads([(LIST6_MENU, "p")])["ipv6/firewall/filter"], 400, None, lacking, "w", s)
    with pytest.raises(ConfigError):
        RouterOsDriver()._reply(optional, 401, None, b'{"error":401,"message":"Unauthorized"}', "w", s)


# -- errors ---------------------------------------------------------------------------------

def test_documented_errors_map_to_our_kinds() -> None:
    # DELETE .../rest/ip/address/*9 a second time
    gone = classify(404, b'{"error":404,"message":"Not Found"}', "ppp/secret/alice: DELETE", "login")
    assert isinstance(gone, PermanentError) and "ppp/secret/alice" in str(gone) and "Not Found" in str(gone)
    # a command that ran into the 60 s limit
    closed = classify(400, b'{"detail":"Session closed","error":400,"message":"Bad Request"}', "w", "login")
    assert type(closed) is TransientError
    # attempting to delete an interface
    no_cmd = classify(406, b'{"error":406,"message":"Not Acceptable","detail":"no such command or directory (remove)"}',
                      "w", "login")
    assert isinstance(no_cmd, PermanentError) and "no such command or directory (remove)" in str(no_cmd)
    assert classify(200, b"[]", "w", "login") is None and classify(204, b"", "w", "login") is None


def test_auth_redirect_and_server_errors() -> None:
    login = "user 'agent' (password file 'router-1')"
    refused = classify(401, b'{"error":401,"message":"Unauthorized"}', "w", login)
    assert isinstance(refused, ConfigError) and "'router-1'" in str(refused)
    assert "allowed addresses" in str(refused), "RouterOS says 401 for a login from outside the user's addresses too"
    moved = classify(301, b"", "w", login, "https://elsewhere.example/\x1b[2J")
    assert isinstance(moved, PermanentError) and "elsewhere.example" in str(moved) and "\x1b" not in str(moved)
    assert type(classify(503, b"<html>busy</html>", "w", login)) is TransientError
    assert type(classify(429, b"", "w", login)) is TransientError
    assert isinstance(classify(403, b"", "w", login), ConfigError)


def test_fingerprint_mismatch_and_timeouts_map_once() -> None:
    s = settings(Device("r", "routeros", "https://10.0.0.1", options={"username": "a"}, credential="c"), 3.0)
    mismatch = transport_error(aiohttp.ServerFingerprintMismatch(b"\x01" * 32, b"\xab" * 32, "10.0.0.1", 443), "w", s)
    assert isinstance(mismatch, ConfigError) and "ab:ab:ab" in str(mismatch)
    assert type(transport_error(TimeoutError(), "w", s)) is NoAnswerError
    assert type(transport_error(aiohttp.ServerDisconnectedError(), "w", s)) is TransientError


# -- options --------------------------------------------------------------------------------

def test_fingerprint_accepts_openssl_output_and_refuses_garbage() -> None:
    digest = bytes(range(32))
    assert parse_fingerprint(digest.hex(":").upper()) == digest
    assert parse_fingerprint("sha256:" + digest.hex()) == digest
    for bad in ("abcd", digest.hex()[:-1] + "g", 42):
        with pytest.raises(ConfigError, match="tls_fingerprint"):
            parse_fingerprint(bad)


def test_address_forms() -> None:
    assert parse_base("10.0.0.1") == "https://10.0.0.1"
    assert parse_base("http://router.lan:8080/") == "http://router.lan:8080"
    for bad in ("ftp://x", "https://x/rest", "https://admin:pw@x", "", "https://x:99999"):
        with pytest.raises(ConfigError):
            parse_base(bad)


@pytest.mark.parametrize(("options", "credential", "match"), [
    ({}, "c", "username"),
    ({"username": "a:b"}, "c", "username"),
    ({"username": "a"}, None, "credential"),
    ({"username": "a", "tls_fingerprint": "00" * 32, "ca_file": "/x"}, "c", "not both"),
    ({"username": "a", "tls_fingerprnt": "00" * 32}, "c", "unknown option"),
    ({"username": "a", "timeout": 0}, "c", "timeout"),
    ({"username": "a", "manage_foreign_entries": "yes"}, "c", "manage_foreign_entries"),
    ({"username": "a", "entry_comment": ""}, "c", "entry_comment"),
    ({"username": "a", "tls_server_name": "router isp"}, "c", "tls_server_name must be a DNS name"),
    ({"username": "a", "tls_server_name": "router.isp", "tls_fingerprint": "00" * 32}, "c", "checks no name"),
])
def test_options_that_cannot_work_are_config_errors(options: dict, credential: str | None, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        settings(Device("r", "routeros", "https://10.0.0.1", options=options, credential=credential), 3.0)


def test_tls_options_need_https() -> None:
    with pytest.raises(ConfigError, match="api-ssl"):
        settings(Device("r", "routeros", "api://10.0.0.1", options={"username": "a", "ca_file": "/x"},
                        credential="c"), 3.0)
    with pytest.raises(ConfigError, match="https"):
        settings(Device("r", "routeros", "http://10.0.0.1", options={"username": "a", "tls_fingerprint": "00" * 32},
                        credential="c"), 3.0)
