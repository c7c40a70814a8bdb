"""Many native threads writing at once: the check of state shared between threads."""

from __future__ import annotations

import sys
from collections.abc import Callable

from compute_agent import green

THREADS, WRITES = 8, 10_000


def hammer(work: Callable[[int], object], threads: int = THREADS) -> None:
    """Run ``work(thread_index)`` in ``threads`` native threads at once, switching often.

    With the interpreter's switch interval at a microsecond, an unguarded
    read-modify-write loses updates (the old metrics counters lost a third).
    Native threads on both backends: under eventlet the same state is
    written by the hub's thread and the native pool's.
    """
    start = green.native_event()
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        running = [
            green.native_thread(lambda i=i: (start.wait(), work(i)), name=f"writer-{i}")
            for i in range(threads)
        ]
        start.set()
        for t in running:
            t.join(120)
            assert not t.is_alive()
    finally:
        sys.setswitchinterval(interval)
