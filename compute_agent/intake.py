"""Bounded intake: how many requests that do work run at once, and one log line per burst.

Every request the agent serves runs on the one hub. A request that changes
something (build, stop, ...) does its database work on the hub without
yielding, a few milliseconds each; with oslo's 64 executor workers all busy
on a flood of casts, one turn of the hub ran all of them back to back and
one worker took request after request from its queue without ever
yielding: the hub stalled for seconds. So:

- :class:`IntakeGate` lets at most ``slots`` such requests run at once and
  makes the others wait, in arrival order (a ticket queue, not a race for
  the slot), and every admitted request yields once first, so it starts in
  a hub turn of its own. Read-only requests (ping, get_host_state, status)
  never pass the gate: they cannot queue behind a flood.
- :class:`RefusalLog` turns a burst of refused casts into one line per
  method and error type per window, instead of one WARNING each.

Past the bound a request waits (in the gate, and before it in the broker,
whose prefetch bounds what the agent takes in); it is never refused for
load, because a cast's sender would never hear of it.
"""

from __future__ import annotations

import collections
import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass

from compute_agent import exception, green

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class IntakeStatistics:
    """What ``status`` shows of the gate."""

    slots: int
    running: int
    waiting: int
    admitted: int
    done: int
    max_waiting: int
    max_wait_s: float


class IntakeGate:
    """At most ``slots`` holders at once; the others wait in arrival order."""

    def __init__(self, slots: int) -> None:
        if slots < 1:
            raise exception.InvalidInput(f"intake slots must be at least 1, not {slots}")
        self.slots = slots
        self.running = 0
        self._waiters: collections.deque[green.Event] = collections.deque()
        self.admitted = 0
        self.done = 0
        self.max_waiting = 0
        self.max_wait = 0.0
        # Guards the counts and the queue (tasks may be threads); never held across a wait.
        self._guard = green.native_lock()

    @contextlib.contextmanager
    def admit(self) -> Iterator[None]:
        """Hold a slot for the block; wait for one, first come first served."""
        self._acquire()
        try:
            # A turn of its own: an admitted request never runs in the same
            # hub slice as the one that handed it the slot.
            green.yield_now()
            yield
        finally:
            self._release()

    def _acquire(self) -> None:
        started = green.monotonic()
        ticket = None
        with self._guard:
            if self.running < self.slots and not self._waiters:
                self.running += 1
            else:
                ticket = green.Event()
                self._waiters.append(ticket)
                self.max_waiting = max(self.max_waiting, len(self._waiters))
        if ticket is not None:
            try:
                ticket.wait()
            except BaseException:
                self._abandon(ticket)
                raise
        with self._guard:
            self.admitted += 1
            self.max_wait = max(self.max_wait, green.monotonic() - started)

    def _abandon(self, ticket: green.Event) -> None:
        """A waiter killed in the queue: drop its ticket, or pass on the slot it got."""
        with self._guard:
            if not ticket.is_set():
                with contextlib.suppress(ValueError):
                    self._waiters.remove(ticket)
                return
        self._release(count=False)

    def _release(self, count: bool = True) -> None:
        with self._guard:
            if count:
                self.done += 1
            if self._waiters:
                # The slot passes straight to the oldest waiter: running stays the same.
                self._waiters.popleft().set()
            else:
                self.running -= 1

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def statistics(self) -> IntakeStatistics:
        return IntakeStatistics(
            slots=self.slots,
            running=self.running,
            waiting=self.waiting,
            admitted=self.admitted,
            done=self.done,
            max_waiting=self.max_waiting,
            max_wait_s=round(self.max_wait, 4),
        )


class RefusalLog:
    """Refused requests, logged once per (kind, method, error type) per ``window`` s.

    The first refusal of a burst is logged in full at once; the ones after
    it are counted and summed up in one line when the window ends, e.g.
    ``refused 4999 more casts of stop_instance in the last 10 s:
    InstanceNotFound (last: ...)``.
    """

    FIRST = "RPC %(kind)s %(method)s refused: %(type)s: %(error)s"
    SUMMARY = (
        "refused %(n)d more %(kind)ss of %(method)s in the last %(window).0f s: "
        "%(type)s (last: %(last)s)"
    )

    def __init__(
        self,
        logger: logging.Logger,
        window: float = 10.0,
        *,
        first: str = FIRST,
        summary: str = SUMMARY,
        name: str = "rpc-refusal-log",
    ) -> None:
        """``first``, ``summary``: %-formats of kind, method, type, error / n, window, last."""
        self.logger = logger
        self.window = window
        self.first = first
        self.summary = summary
        self.name = name
        self.total = 0
        self._counts: collections.Counter[tuple[str, str, str]] = collections.Counter()
        self._last: dict[tuple[str, str, str], str] = {}
        self._levels: dict[tuple[str, str, str], int] = {}
        self._flusher: green.Task | None = None
        self._guard = green.native_lock()  # the counts; never held while logging

    def refused(
        self, kind: str, method: str, error: BaseException, level: int = logging.WARNING
    ) -> None:
        """Count one refused ``kind`` ("cast" or "call") of ``method``; log it if first."""
        key = (kind, method, type(error).__name__)
        with self._guard:
            self.total += 1
            first = self._flusher is None or key not in self._last
            if first:
                self._last[key] = ""
                self._levels[key] = level
            else:
                self._counts[key] += 1
                self._last[key] = str(error)
            if self._flusher is None:
                self._flusher = green.call_later(self.window, self.flush, name=self.name)
        if first:
            # The first of its kind in this window: in full, at once.
            fields = {"kind": kind, "method": method, "type": key[2], "error": error}
            self.logger.log(level, self.first, fields)

    def flush(self) -> None:
        """Log the counted refusals, one line per method and type, and start a new window."""
        with self._guard:
            self._flusher = None
            counts, last, levels = self._counts, self._last, self._levels
            self._counts, self._last, self._levels = collections.Counter(), {}, {}
        for key, n in sorted(counts.items()):
            kind, method, error_type = key
            fields = {
                "n": n,
                "kind": kind,
                "method": method,
                "window": self.window,
                "type": error_type,
                "last": last[key][:200],
            }
            self.logger.log(levels[key], self.summary, fields)

    def stop(self) -> None:
        """Say what is still counted, now (the agent is stopping)."""
        flusher = self._flusher
        if flusher is not None:
            flusher.cancel()
            self.flush()
