"""One running process per agent id, pure: who holds an agent id and whether another may start."""

from __future__ import annotations

import pytest

from agent.db.identity import Holder, host_identity, in_use

HERE = "gw/boot:b1/pidns:4026531836"


def holder(host_id: str | None = "gw2/boot:b2/pidns:4026531836", pid: int = 700, state: str = "ready",
           age: float = 5.0) -> Holder:
    return Holder("gw2", host_id, pid, state, age, "0.2.0")


def test_a_live_agent_with_the_same_id_on_another_host_is_named():
    why = in_use("gw1", holder(), HERE, 100, stale_after=180)
    assert why is not None and "AGENT_AGENT_ID 'gw1' is in use by a running agent on host gw2 (pid 700" in why
    assert "give each agent its own AGENT_AGENT_ID" in why


def test_another_live_process_of_this_host_is_named():
    why = in_use("gw1", holder(HERE, pid=700), HERE, 100, stale_after=180, is_alive=lambda pid: True)
    assert why is not None and "on this host (pid 700" in why


@pytest.mark.parametrize(("h", "why"), [
    (None, "never registered"),
    (holder(state="stopped"), "stopped cleanly"),
    (holder(age=181), "heartbeat stale"),
    (holder(HERE, pid=700), "its process is gone from this host"),
    (holder(HERE, pid=100), "this very process (an earlier start in it)"),
])
def test_an_agent_id_whose_holder_is_gone_may_start(h, why):
    assert in_use("gw1", h, HERE, 100, stale_after=180, is_alive=lambda pid: False) is None, why


def test_a_host_is_told_apart_from_a_clone_with_its_name_by_its_boot_id():
    ident = host_identity()
    assert "/boot:" in ident and "/pidns:" in ident


def test_escape_sequences_in_the_holders_row_do_not_reach_the_message():
    h = Holder("gw2\x1b[31m", None, 7, "ready", 1.0, "0.2.0\n")
    why = in_use("gw1", h, HERE, 100, stale_after=180)
    assert why is not None and "\x1b" not in why and "\n" not in why
