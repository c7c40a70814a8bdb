"""Waiting out a database that refuses connections for load.

A server at its max_connections (PostgreSQL's "too many clients", MariaDB's
"Too many connections"), a role's connection limit or a full PgBouncer is
not down: a connection is free again a moment later. Such a refusal
(``DatabaseBusy``) is retried with a growing, jittered pause (hosts of a
fleet refused together do not come back together) and one log line per
pause, within a budget; any other error passes through at once.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from typing import TypeVar

from compute_agent import exception, green

LOG = logging.getLogger(__name__)

T = TypeVar("T")

FIRST_PAUSE = 0.5
MAX_PAUSE = 10.0


class BusyWaiter:
    """Retries calls refused for load until ``budget`` seconds from its creation have passed.

    One waiter per deadline: the agent's start makes one and passes every
    start-up call through it, so the whole start waits at most ``budget``.
    ``status`` (systemd's STATUS line) hears what is being waited for.
    """

    def __init__(
        self,
        budget: float,
        *,
        status: Callable[[str], object] | None = None,
        first_pause: float = FIRST_PAUSE,
        max_pause: float = MAX_PAUSE,
        level: int = logging.WARNING,
        clock: Callable[[], float] = green.monotonic,
        sleep: Callable[[float], None] = green.sleep,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self.budget = budget
        self.started = clock()
        self.retries = 0
        self._status = status
        self._first = first_pause
        self._max = max_pause
        self._level = level
        self._clock = clock
        self._sleep = sleep
        self._jitter = jitter

    def call(self, what: str, fn: Callable[[], T]) -> T:
        """``fn()``, retried while it raises DatabaseBusy and the budget allows one more pause."""
        pause = self._first
        while True:
            try:
                return fn()
            except exception.DatabaseBusy as exc:
                waited = self._clock() - self.started
                # Half to one and a half times the nominal pause.
                wait = min(pause, self._max) * (0.5 + self._jitter())
                if waited + wait > self.budget:
                    if self.retries:
                        raise exception.DatabaseBusy(
                            f"{exc.message} (still refused after {waited:.1f} s of retries)"
                        ) from exc
                    raise
                self.retries += 1
                LOG.log(
                    self._level,
                    "%s: %s; retrying in %.1f s (waited %.1f s of %.0f s)",
                    what,
                    exc.message,
                    wait,
                    waited,
                    self.budget,
                )
                if self._status is not None:
                    self._status(f"{what}: waiting for a busy database ({exc.message})")
                self._sleep(wait)
                pause *= 2
