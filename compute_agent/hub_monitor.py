"""Hub-lag monitor: how late the hub wakes a greenthread, and who is to blame.

A greenthread sleeps for a fixed interval and measures how much later than
asked it woke up. Any lag means some code ran on the hub without yielding.
To name the culprit, a greenlet switch tracer times every uninterrupted run
of every greenthread; when the lag passes the warning threshold, the log
names the greenthread whose single run was longest since the last wake-up.

With the threads backend (``green.HAS_HUB`` false) there is no hub and no
switch to trace: the monitor does not start and its figures stay at zero.
"""

from __future__ import annotations

import gc
import logging
import math
import os
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from compute_agent import green
from compute_agent.metrics import registry
from compute_agent.utils import percentile

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class LagStatistics:
    samples: int
    last_s: float
    max_s: float
    p50_s: float
    p99_s: float
    warnings: int
    worst_offender: str | None
    gc_collections: int
    gc_max_s: float


class CollectionTimer:
    """Times Python's garbage collections, in whatever thread they run.

    A collection holds the GIL throughout, so it stalls the hub whoever
    triggered it; the switch tracer alone would blame the greenthread that
    happened to be running.
    """

    def __init__(self) -> None:
        self._started = 0.0
        self.collections = 0
        self.max = 0.0
        # (seconds, generation) of each collection since the last take(). Python
        # runs one collection at a time, so the callback is its only writer;
        # take() runs in another thread and swaps the list whole (one store):
        # an append lands in the list it took or in the new one, never lost.
        # No lock: one taken here could be wanted again by a collection
        # triggered while its own thread holds it.
        self._window: list[tuple[float, int]] = []

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        took = time.perf_counter() - self._started
        self.collections += 1
        self.max = max(self.max, took)
        self._window.append((took, info.get("generation", -1)))

    def take(self) -> tuple[float, float, int]:
        """Total and longest collection time since the last call, and the longest's generation."""
        window, self._window = self._window, []
        if not window:
            return 0.0, 0.0, -1
        longest = max(window)
        return math.fsum(t for t, _ in window), longest[0], longest[1]


class SliceTracer:
    """Times each greenthread's uninterrupted run between switches."""

    def __init__(self) -> None:
        self._since = green.monotonic()
        self.longest = 0.0
        self.longest_name: str | None = None

    def __call__(self, event: str, args: Any) -> None:
        if event not in ("switch", "throw"):
            return
        origin, _target = args
        now = green.monotonic()
        ran = now - self._since
        self._since = now
        if ran > self.longest:
            self.longest, self.longest_name = ran, green.greenlet_name(origin)

    def take(self) -> tuple[float, str | None]:
        """The longest run since the last call, and its greenthread's name."""
        result = (self.longest, self.longest_name)
        self.longest, self.longest_name = 0.0, None
        return result


class HubLagMonitor:
    def __init__(self, interval: float, warn_after: float, window: int = 1000) -> None:
        self.interval = interval
        self.warn_after = warn_after
        self._recent: deque[float] = deque(maxlen=window)
        self.samples = 0
        self.last = 0.0
        self.max = 0.0
        self.warnings = 0
        self.worst_offender: str | None = None
        self._worst_slice = 0.0
        self._tracer = SliceTracer()
        self._collections = CollectionTimer()
        self._previous_tracer: Any = None
        self._thread: green.Task | None = None
        self._stopping = False

    def start(self) -> None:
        if not green.HAS_HUB:
            return
        self._previous_tracer = green.set_switch_tracer(self._tracer)
        gc.callbacks.append(self._collections)
        self._thread = green.spawn(self._loop, name="hub-lag-monitor")

    def stop(self) -> None:
        self._stopping = True
        if self._thread is not None:
            self._thread.cancel()
            self._thread = None
        green.set_switch_tracer(self._previous_tracer)
        if self._collections in gc.callbacks:
            gc.callbacks.remove(self._collections)

    def _loop(self) -> None:
        queued = RunQueueClock()
        try:
            while not self._stopping:
                asked, cpu, waited = green.monotonic(), time.thread_time(), queued.read()
                green.sleep(self.interval)
                lag = max(0.0, green.monotonic() - asked - self.interval)
                longest, culprit = self._tracer.take()
                self.record(
                    lag,
                    longest,
                    culprit,
                    time.thread_time() - cpu,
                    self._collections.take(),
                    _difference(queued.read(), waited),
                )
        finally:
            queued.close()

    def record(
        self,
        lag: float,
        longest: float = 0.0,
        culprit: str | None = None,
        cpu: float | None = None,
        collections: tuple[float, float, int] = (0.0, 0.0, -1),
        runnable: float | None = None,
    ) -> None:
        """Count one wake-up ``lag`` late; ``cpu``: the hub thread's CPU time meanwhile.

        A lag with little CPU spent means the hub's thread waited, not ran:
        for the GIL, or for a CPU the operating system gave to another process.
        ``collections``: garbage collection time meanwhile (total, longest, its generation).
        ``runnable``: how long the hub's thread waited meanwhile for a CPU.
        """
        self.samples += 1
        self.last = lag
        registry.HUB_LAG.observe(lag)
        self.max = max(self.max, lag)
        self._recent.append(lag)
        if longest > self._worst_slice:
            self._worst_slice, self.worst_offender = longest, culprit
        if lag >= self.warn_after:
            self.warnings += 1
            LOG.warning(
                "hub lag %.3f s: greenthread %r ran %.3f s without yielding%s%s%s",
                lag,
                culprit or "unknown",
                longest,
                "" if cpu is None else f"; the hub's thread used {cpu:.3f} s of CPU",
                _collections_note(collections),
                "" if runnable is None else f"; it waited {runnable:.3f} s for a CPU",
            )

    def statistics(self) -> LagStatistics:
        ordered = list(self._recent)
        return LagStatistics(
            samples=self.samples,
            last_s=round(self.last, 4),
            max_s=round(self.max, 4),
            p50_s=round(percentile(ordered, 0.50), 4),
            p99_s=round(percentile(ordered, 0.99), 4),
            warnings=self.warnings,
            worst_offender=self.worst_offender,
            gc_collections=self._collections.collections,
            gc_max_s=round(self._collections.max, 4),
        )


class RunQueueClock:
    """How long the calling thread has waited, runnable, for a CPU (Linux schedstat).

    A hub-lag with the hub's thread runnable but not running is the host's
    CPUs being busy with other processes, which no change to the agent
    fixes; without this, the log blamed whichever greenthread was current.
    """

    PATH = "/proc/thread-self/schedstat"

    def __init__(self) -> None:
        try:
            self._fd: int | None = os.open(self.PATH, os.O_RDONLY)
        except OSError:
            self._fd = None

    def read(self) -> float | None:
        """Seconds spent runnable and waiting since the thread started; None if unknown."""
        if self._fd is None:
            return None
        try:
            return int(os.pread(self._fd, 128, 0).split()[1]) / 1e9
        except (OSError, IndexError, ValueError):
            return None

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _collections_note(collections: tuple[float, float, int]) -> str:
    total, longest, generation = collections
    if total < 0.001:
        return ""
    return (
        f"; garbage collection took {total:.3f} s "
        f"(longest {longest:.3f} s, generation {generation})"
    )


def _difference(now: float | None, before: float | None) -> float | None:
    """``now - before``, or None when either reading is unknown."""
    return None if now is None or before is None else now - before
