"""The radius driver's pure decisions: options, keys, what the store's rows and the NAS's replies mean."""

from __future__ import annotations

import pytest

from agent.drivers import radius_proto as p
from agent.errors import ConfigError, PermanentError, TransientError

BASE = {"policy_credential": "radius-db"}


def opts(**extra: object) -> p.Options:
    return p.parse_options({**BASE, **extra}, "192.0.2.1", 10.0)


def policy(*groups: tuple[str, int], sessions: int = 0, known: bool = True) -> p.Policy:
    return p.Policy("alice", known, groups, tuple(p.Session(i, f"s{i}", "10.0.0.2") for i in range(sessions)))


def test_defaults_disconnect_on_suspend_and_restore_with_the_address_as_nas_ip() -> None:
    o = opts()
    assert (o.suspended_group, o.suspend, o.restore, o.nas_ip, o.accounting) == \
        ("suspended", "disconnect", "disconnect", "192.0.2.1", True)
    assert (o.timeout, o.retries) == (10.0, 2)


@pytest.mark.parametrize("extra", [{"policy_credential": None}, {"policy_credential": "../x"},
                                   {"suspended_group": "a b"}, {"suspend": "kick"}, {"restore": "later"},
                                   {"suspend": "coa"}, {"restore": "coa"}, {"coa_attributes": []},
                                   {"coa_attributes": {"Filter-Id": True}}, {"nas_ip": "nas.example"},
                                   {"timeout": 0}, {"retries": -1}, {"retries": 11}, {"accounting": "yes"}])
def test_bad_options_are_config_errors(extra: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        p.parse_options({**BASE, **extra}, "192.0.2.1", 10.0)


def test_a_host_name_address_needs_nas_ip() -> None:
    with pytest.raises(ConfigError, match="nas_ip"):
        p.parse_options(BASE, "nas.example:3799", 10.0)
    assert p.parse_options({**BASE, "nas_ip": "192.0.2.7"}, "nas.example", 10.0).nas_ip == "192.0.2.7"


def test_coa_attributes_as_object_or_pairs() -> None:
    coa = opts(suspend="coa", coa_attributes={"Filter-Id": "suspended"})
    assert coa.coa_attributes == (("Filter-Id", "suspended"),)
    pairs = [["Mikrotik-Address-List", "suspended"], ["Session-Timeout", 60]]
    assert opts(suspend="coa", coa_attributes=pairs).coa_attributes == \
        (("Mikrotik-Address-List", "suspended"), ("Session-Timeout", "60"))


@pytest.mark.parametrize(("address", "expected"), [("192.0.2.1", ("192.0.2.1", 3799)), ("nas:1700", ("nas", 1700)),
                                                   ("[2001:db8::1]:3799", ("2001:db8::1", 3799))])
def test_addresses(address: str, expected: tuple[str, int]) -> None:
    assert p.parse_address(address) == expected


@pytest.mark.parametrize("address", [None, "", "udp://nas", "nas:0", "nas:x", "[::1]x"])
def test_bad_addresses(address: str | None) -> None:
    with pytest.raises(ConfigError):
        p.parse_address(address)


def test_service_keys_name_a_user() -> None:
    assert p.parse_service("user/alice@isp") == "alice@isp"
    for bad in ("alice", "user/", "user/a\nb", "user/" + "x" * 254, 7):
        with pytest.raises(PermanentError):
            p.parse_service(bad)


def test_the_suspended_group_must_sort_before_every_other_group() -> None:
    assert not p.suspended(policy(("plan", 1)), "suspended")
    assert p.suspended(policy(("suspended", 0), ("plan", 1)), "suspended")
    assert not p.suspended(policy(("suspended", 1), ("plan", 1)), "suspended")  # a tie: FreeRADIUS picks either
    assert not p.suspended(policy(("suspended", 5), ("plan", 1)), "suspended")
    assert p.suspended(policy(("suspended", 0)), "suspended")


def test_suspend_priority_sorts_first() -> None:
    assert p.suspend_priority(policy(("plan", 1)), "suspended") == 0
    assert p.suspend_priority(policy(("plan", 0), ("suspended", 9)), "suspended") == -1
    assert p.suspend_priority(policy(), "suspended") == 0


def test_off_needs_no_open_session_unless_the_session_is_changed_by_coa() -> None:
    assert p.state_of(policy(("suspended", 0), ("plan", 1)), opts(), "x") == "off"
    assert p.state_of(policy(("suspended", 0), ("plan", 1), sessions=1), opts(), "x") == "on"
    coa = opts(suspend="coa", coa_attributes={"Filter-Id": "suspended"})
    assert p.state_of(policy(("suspended", 0), sessions=1), coa, "x") == "off"
    assert p.state_of(policy(("plan", 1), sessions=1), opts(), "x") == "on"


def test_an_unknown_user_is_permanent() -> None:
    with pytest.raises(PermanentError, match="no such subscriber"):
        p.state_of(policy(known=False), opts(), "nas: user/bob")


def test_session_attributes_name_the_session_as_radacct_has_it() -> None:
    s = p.Session(7, "81a00003", "10.0.0.2")
    assert p.session_attributes("alice", "192.0.2.1", s) == (
        ("NAS-IP-Address", "192.0.2.1"), ("User-Name", "alice"), ("Acct-Session-Id", "81a00003"),
        ("Framed-IP-Address", "10.0.0.2"))
    assert p.session_attributes("alice", "2001:db8::1", None) == (("NAS-IPv6-Address", "2001:db8::1"),
                                                                 ("User-Name", "alice"))
    odd = p.Session(8, "x" * 300, None)  # radacct holds what the NAS sent; an attribute holds 253 octets
    assert p.session_attributes("alice", "192.0.2.1", odd) == (("NAS-IP-Address", "192.0.2.1"), ("User-Name", "alice"))


def test_nak_meanings() -> None:
    assert p.nak_error(p.DISCONNECT_ACK, [], "x") is None
    assert p.nak_error(p.DISCONNECT_NAK, [503], "x") is None  # no such session: nothing left to end
    assert isinstance(p.nak_error(p.COA_NAK, [506], "x"), TransientError)
    mismatch = p.nak_error(p.DISCONNECT_NAK, [403], "x")
    assert isinstance(mismatch, PermanentError) and "nas_ip" in str(mismatch)
    assert isinstance(p.nak_error(p.DISCONNECT_NAK, [], "x"), PermanentError)
    assert "Error-Cause 999" in str(p.nak_error(p.DISCONNECT_NAK, [999], "x"))
