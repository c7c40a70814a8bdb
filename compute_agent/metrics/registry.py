"""The process's metrics: counters and histograms updated where events happen, read at scrape time.

They are written from any thread (requests run on RPC workers and the
admin socket's, libvirt calls on the pool's threads, under threads mode
on their own) and read by the scrape's native thread. A change is a
read-modify-write, which the GIL does not make atomic: each family holds a
native lock, taken for the few bytecodes of one change or one copy and
never across a switch point, so it never blocks the hub for longer. A
reader gets a histogram's buckets, count and sum from one moment.
Nothing here imports prometheus_client, so the hot paths stay light.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence

from compute_agent import green

# Seconds: from a hub stall worth noticing to a sync of thousands of instances.
DURATION_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 120.0, 300.0,
)  # fmt: skip
# Hub lag: the agent's budget is 50 ms; past a second the service looks dead.
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Histogram:
    """Observations counted in buckets (each counts values <= its bound), and their sum."""

    def __init__(self, buckets: Sequence[float] = DURATION_BUCKETS) -> None:
        self.bounds = tuple(sorted(float(b) for b in buckets))
        self._lock = green.native_lock()
        self._counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self._sum = 0.0

    def observe(self, value: float) -> None:
        i = bisect.bisect_left(self.bounds, value)
        with self._lock:
            self._counts[i] += 1
            self._sum += value

    def clear(self) -> None:
        with self._lock:
            self._counts = [0] * (len(self.bounds) + 1)
            self._sum = 0.0

    def snapshot(self) -> tuple[list[tuple[float, int]], int, float]:
        """Cumulative buckets ``(bound, count)`` ending with +Inf, the count, the sum."""
        with self._lock:
            counts, total_sum = list(self._counts), self._sum
        total, cumulative = 0, []
        for bound, n in zip((*self.bounds, math.inf), counts, strict=True):
            total += n
            cumulative.append((bound, total))
        return cumulative, total, total_sum


class HistogramFamily:
    """One histogram per combination of label values."""

    def __init__(self, labels: tuple[str, ...], buckets: Sequence[float] = DURATION_BUCKETS):
        self.labels = labels
        self.buckets = tuple(buckets)
        self._lock = green.native_lock()
        self._children: dict[tuple[str, ...], Histogram] = {}

    def observe(self, values: tuple[str, ...], value: float) -> None:
        child = self._children.get(values)
        if child is None:
            with self._lock:  # two first observations must not make two children
                child = self._children.get(values)
                if child is None:
                    child = self._children[values] = Histogram(self.buckets)
        child.observe(value)

    def items(self) -> list[tuple[tuple[str, ...], Histogram]]:
        with self._lock:
            return list(self._children.items())

    def clear(self) -> None:
        with self._lock:
            self._children = {}


class CounterFamily:
    """A monotonically growing count per combination of label values."""

    def __init__(self, labels: tuple[str, ...], preset: Sequence[tuple[str, ...]] = ()) -> None:
        self.labels = labels
        self._preset = tuple(preset)
        self._lock = green.native_lock()
        self._values: dict[tuple[str, ...], float] = dict.fromkeys(self._preset, 0.0)

    def inc(self, values: tuple[str, ...], amount: float = 1.0) -> None:
        with self._lock:
            self._values[values] = self._values.get(values, 0.0) + amount

    def items(self) -> list[tuple[tuple[str, ...], float]]:
        with self._lock:
            return list(self._values.items())

    def clear(self) -> None:
        with self._lock:
            self._values = dict.fromkeys(self._preset, 0.0)


SYNC_OUTCOMES = ("checked", "changed", "skipped", "errors")

# The process's metrics: one agent per process.
HUB_LAG = Histogram(LAG_BUCKETS)
TASK_DURATION = HistogramFamily(("task",))
POWER_SYNC_INSTANCES = CounterFamily(("outcome",), preset=[(o,) for o in SYNC_OUTCOMES])
REQUESTS = CounterFamily(("front", "method", "outcome"))
REQUEST_DURATION = HistogramFamily(("front", "method"))
LIBVIRT_CALL_DURATION = HistogramFamily(("call",))


def count_sync(summary: object) -> None:
    """Add one power-sync summary (a run or one instance) to the outcome counters."""
    for outcome in SYNC_OUTCOMES:
        n = getattr(summary, outcome, 0)
        if n:
            POWER_SYNC_INSTANCES.inc((outcome,), n)


def libvirt_call_name(fn: object) -> str:
    """``_all_stats_native`` -> ``all_stats``: a bounded label from the code's own names."""
    name = getattr(fn, "__name__", "call").strip("_")
    return name.removesuffix("_native") or "call"


def reset() -> None:
    """Forget every metric (tests)."""
    for family in (HUB_LAG, TASK_DURATION, POWER_SYNC_INSTANCES, REQUESTS, REQUEST_DURATION,
                   LIBVIRT_CALL_DURATION):  # fmt: skip
        family.clear()
