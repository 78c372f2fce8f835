"""The cyclic garbage collector, set for a daemon that makes and drops many small objects.

Nearly everything the agent makes for a command (its delivery, its work, its readings, its outcome
and rows) is freed by reference counting as soon as it is done with. The cyclic collector does not
know that: at CPython's defaults it walks the young objects every 700 allocations and the older
ones every tenth and hundredth time, finding almost nothing. In a month-end drain of 20,000
commands that was some 400 walks, 150 ms of agentd's 1.0 s of CPU (docs/performance.md).

After start-up, what start-up made (modules, settings, the inventory, the pool) is moved out of the
collector's sight for good (`gc.freeze`: it is still freed by reference counting when dropped), and
the young generation is walked every `YOUNG` allocations. Cycles (an exception and its traceback, a
task and its callbacks) are still collected, within `YOUNG` allocations of their creation: a few
megabytes at most wait for it.
"""

from __future__ import annotations

import gc

YOUNG = 50_000  # allocations between two walks of the young generation (CPython: 700)
MIDDLE = 20     # walks of the young generation between two of the middle one (CPython: 10)
OLD = 10        # walks of the middle generation between two full ones (CPython: 10)


def settle() -> None:
    """Once start-up is done: collect its garbage, keep the rest out of every later walk, and walk
    the young generation less often."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG, MIDDLE, OLD)
