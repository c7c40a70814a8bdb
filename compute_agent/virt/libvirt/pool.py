"""The libvirt connections that carry calls: each carries one call at a time.

libvirt 9.0's remote client crashes the process (SIGSEGV in its I/O loop)
when several threads wait for replies on one connection and its keepalive
closes it under them: a libvirtd frozen past the keepalive, then thawed,
killed the agent (docs/reliability.md). So no connection here ever has two
calls in it: a call checks a connection out, runs in a native thread, and
that thread gives the connection back when the call returns.

A call can stay in libvirt for long (a QEMU monitor that hangs, a frozen
daemon). Its connection stays with it, and once it has run longer than
``stuck_after`` it is *set aside*: no longer counted in the pool, so that a
new connection can carry the other calls. The thread that made the call
closes a set-aside connection when the call returns, never before (closing a
connection with a call in it is a use-after-free). At most ``max_stuck``
connections are set aside at once; past that, callers wait for one to free.

Invariants (under ``_lock``):
- a connection is in ``_idle`` or in ``_busy``, never both, and a busy one
  carries exactly one call;
- ``_live`` counts the idle, the busy not set aside, and the ones being
  opened: it never exceeds ``size``;
- ``_stuck`` counts the busy connections set aside: it never exceeds
  ``max_stuck``;
- a connection of an older generation is never handed out again.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable
from typing import Any, TypeVar

from compute_agent import exception, green
from compute_agent.virt.driver import ConnectionStatistics

LOG = logging.getLogger(__name__)
T = TypeVar("T")

# A caller that found every connection busy is woken when one is given back;
# it also looks again this often, for what no call's return announces: a
# busy call turning stuck (a connection may be set aside) or a lost generation.
RECHECK_S = 0.1


class Connection:
    """One raw libvirt connection, and the call it carries now (if any)."""

    __slots__ = ("generation", "lifecycle_id", "raw", "set_aside", "started")

    def __init__(self, raw: Any, generation: int, lifecycle_id: int | None = None) -> None:
        self.raw = raw
        self.generation = generation
        # The lifecycle-event registration on it (only a connection that also serves events).
        self.lifecycle_id = lifecycle_id
        self.started: float | None = None  # when its current call began (monotonic)
        self.set_aside = False


class ConnectionPool:
    """Up to ``size`` connections, each lent to one call at a time.

    ``open_raw`` (run in a native thread) opens a raw connection; None means
    the pool must never open one itself and is given its one connection by
    :meth:`adopt` (libvirt's test driver on a node file keeps the host's
    state per connection, so a second connection would see another host).
    ``close_raw(connection)`` closes one, in a native thread.
    """

    def __init__(
        self,
        open_raw: Callable[[], Any] | None,
        close_raw: Callable[[Connection], None],
        *,
        size: int,
        stuck_after: float,
        max_stuck: int,
        clock: Callable[[], float] = green.monotonic,
        recheck: float = RECHECK_S,
    ) -> None:
        self._open_raw = open_raw
        self._close_raw = close_raw
        self.size = max(1, size)
        self.stuck_after = stuck_after
        self.max_stuck = max_stuck if open_raw is not None else 0
        self._clock = clock
        self._recheck = recheck
        self._lock = green.native_lock()
        self._idle: list[Connection] = []
        self._busy: set[Connection] = set()
        self._live = 0
        self._stuck = 0
        self._stuck_total = 0
        self._opened_total = 0
        self._generation = 0
        # Callers waiting for a connection, oldest first; each given-back
        # connection wakes the oldest (on the green side: see run).
        self._waiters: collections.deque[green.Event] = collections.deque()

    # -- the green side -----------------------------------------------------

    def run(self, generation: int, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(raw, *args)`` in a native thread on a connection of its own.

        Waits (greenly) while every connection is busy; raises
        HypervisorUnavailable once ``generation`` is no longer the pool's
        (the connection was lost meanwhile).
        """
        connection = self._checkout(generation)
        try:
            result: T = green.execute(self._call, connection, fn, *args)
        finally:
            # The native thread gave the connection back before returning; a
            # green Event can only be set from the green side.
            self._wake_next()
        return result

    def _checkout(self, generation: int) -> Connection:
        """A connection for one call, or a reservation (``raw`` None) to open one."""
        while True:
            with self._lock:
                if generation != self._generation:
                    raise exception.HypervisorUnavailable("the libvirt connection was lost")
                taken = self._take_locked()
                if taken is None:
                    woken = green.Event()
                    self._waiters.append(woken)
            if taken is not None:
                return taken
            try:
                woken.wait(self._recheck)
            except BaseException:
                # Cancelled: a wake it was given goes on to the next caller.
                if not self._leave(woken) and woken.is_set():
                    self._wake_next()
                raise
            self._leave(woken)

    def _leave(self, woken: green.Event) -> bool:
        """Take a waiter out of the line; False if a wake took it out first."""
        with self._lock:
            try:
                self._waiters.remove(woken)
            except ValueError:
                return False
            return True

    def _wake_next(self) -> None:
        with self._lock:
            woken = self._waiters.popleft() if self._waiters else None
        if woken is not None:
            woken.set()

    def _take_locked(self) -> Connection | None:
        now = self._clock()
        if self._idle:
            connection = self._idle.pop()
        elif self._open_raw is not None and (
            self._live < self.size or self._set_aside_one_locked(now)
        ):
            connection = Connection(None, self._generation)  # opened by the call's thread
            self._live += 1
        else:
            return None
        connection.started = now
        self._busy.add(connection)
        return connection

    def _set_aside_one_locked(self, now: float) -> bool:
        if self._stuck >= self.max_stuck:
            return False
        for connection in self._busy:
            if connection.set_aside or connection.generation != self._generation:
                continue
            if connection.started is not None and now - connection.started >= self.stuck_after:
                connection.set_aside = True
                self._live -= 1
                self._stuck += 1
                self._stuck_total += 1
                LOG.warning(
                    "a libvirt call has run for %.0f s; its connection is set aside "
                    "(%d of at most %d) and a new one carries the other calls",
                    now - connection.started,
                    self._stuck,
                    self.max_stuck,
                )
                return True
        return False

    # -- the native side ------------------------------------------------------

    def _call(self, connection: Connection, fn: Callable[..., T], *args: Any) -> T:
        """In a native thread: open if reserved, run, give the connection back."""
        try:
            if connection.raw is None:
                assert self._open_raw is not None
                connection.raw = self._open_raw()
                with self._lock:
                    self._opened_total += 1
            return fn(connection.raw, *args)
        finally:
            self._give_back(connection)

    def _give_back(self, connection: Connection) -> None:
        with self._lock:
            self._busy.discard(connection)
            connection.started = None
            if connection.set_aside:
                self._stuck -= 1
                keep = False
            elif connection.generation != self._generation:
                keep = False  # lost meanwhile: reset() no longer counts it
            elif connection.raw is None:
                self._live -= 1  # the open failed
                keep = False
            else:
                self._idle.append(connection)
                keep = True
        if not keep and connection.raw is not None:
            self._close_raw(connection)

    # -- life cycle -------------------------------------------------------------

    def reset(self, generation: int) -> list[Connection]:
        """Start ``generation``: the idle connections are returned for the caller to
        close; busy ones are closed by their own thread once their call returns."""
        with self._lock:
            self._generation = generation
            idle, self._idle = self._idle, []
            self._live = 0
            return idle

    def adopt(self, raw: Any, lifecycle_id: int | None) -> Connection:
        """Hand the pool a connection opened elsewhere, of the current generation."""
        connection = Connection(raw, self._generation, lifecycle_id)
        with self._lock:
            self._idle.append(connection)
            self._live += 1
            self._opened_total += 1
        return connection

    @property
    def in_flight(self) -> int:
        """Calls running now, set-aside ones included."""
        with self._lock:
            return len(self._busy)

    def statistics(self) -> ConnectionStatistics:
        with self._lock:
            busy = len(self._busy)
            opened = sum(1 for c in self._busy if c.raw is not None) + len(self._idle)
            return ConnectionStatistics(
                size=self.size,
                open=opened,
                busy=busy,
                stuck=self._stuck,
                stuck_total=self._stuck_total,
                opened_total=self._opened_total,
            )
