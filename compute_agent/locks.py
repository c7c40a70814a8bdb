"""Per-instance locks shared by the power-state sync, events and operations."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from compute_agent import green


class KeyedLocks:
    """One green lock per key, created on demand and dropped when unused.

    The table is changed under a native lock held for the update only, so
    tasks on different threads agree on each key's lock and its users.
    """

    def __init__(self) -> None:
        self._locks: dict[str, tuple[green.Semaphore, int]] = {}
        self._guard = green.native_lock()

    @contextlib.contextmanager
    def lock(self, key: str) -> Iterator[None]:
        # Made before the guard is taken: under threads a thread that loses
        # the GIL while it holds the guard makes every other one queue on it.
        fresh = green.Semaphore(1)
        with self._guard:
            sem, users = self._locks.get(key, (fresh, 0))
            self._locks[key] = (sem, users + 1)
        try:
            with sem:
                yield
        finally:
            with self._guard:
                sem, users = self._locks[key]
                if users == 1:
                    del self._locks[key]
                else:
                    self._locks[key] = (sem, users - 1)

    def busy(self, key: str) -> bool:
        """Whether someone holds or waits for ``key``'s lock now."""
        return key in self._locks

    def __len__(self) -> int:
        return len(self._locks)
