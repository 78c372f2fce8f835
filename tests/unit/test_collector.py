"""The cyclic garbage collector as agentd sets it once started (agent/runtime/collector.py)."""

from __future__ import annotations

import gc
import weakref

import pytest

from agent.runtime import collector


@pytest.fixture
def settled():
    before = gc.get_threshold()
    collector.settle()
    yield
    gc.unfreeze()
    gc.set_threshold(*before)


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


def test_what_start_up_made_is_out_of_the_walks_and_the_young_are_walked_less_often(settled):
    assert gc.get_freeze_count() > 0
    assert gc.get_threshold()[0] == collector.YOUNG > 700
    assert gc.isenabled()


def test_a_cycle_made_after_start_up_is_still_collected_within_young_allocations(settled):
    a, b = Node(), Node()
    a.other, b.other = b, a  # an exception and its traceback make such cycles
    gone = weakref.ref(a)
    del a, b
    assert gone() is not None  # reference counting alone cannot free a cycle
    keep = [[] for _ in range(collector.YOUNG + 1000)]  # allocations, as a busy agent makes them
    assert gone() is None, "the young generation was not walked within YOUNG allocations"
    del keep
