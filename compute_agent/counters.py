"""A component's counters, changed from any thread, read as its frozen statistics.

Each component that counts (builds, events, the resume pass) keeps one
:class:`Counters` over its own frozen statistics class: the statistics
class alone names the fields and their defaults, so the two never drift,
and :meth:`Counters.snapshot` is what ``statistics()`` returns.

Under the threads backend a ``+=`` is a read-modify-write another thread
can interleave, so every change holds a native lock, for the few bytecodes
of one change and never across a switch point (it cannot block the hub).
A snapshot is one moment: every field read under the same hold.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Generic, TypeVar

from compute_agent import green

S = TypeVar("S")


class Counters(Generic[S]):
    """The mutable twin of the frozen dataclass ``kind``; fields start at its defaults."""

    _kind: type[S]
    _values: dict[str, Any]
    _lock: Any

    def __init__(self, kind: type[S], **initial: Any) -> None:
        if not dataclasses.is_dataclass(kind):
            raise TypeError(f"{kind!r} is not a dataclass")
        fields = dataclasses.fields(kind)
        values: dict[str, Any] = {}
        for f in fields:
            if f.default is not dataclasses.MISSING:
                values[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                values[f.name] = f.default_factory()
            else:  # no guess: a counter's start is said where its field is
                raise TypeError(f"{kind.__name__}.{f.name} needs a default to count from")
        unknown = set(initial) - values.keys()
        if unknown:
            raise TypeError(f"{kind.__name__} has no field {', '.join(sorted(unknown))}")
        values.update(initial)
        # Set past __setattr__, which refuses plain assignment.
        object.__setattr__(self, "_kind", kind)
        object.__setattr__(self, "_values", values)
        object.__setattr__(self, "_lock", green.native_lock())

    def add(self, **deltas: int) -> None:
        """Add each of ``deltas`` to its counter, in one hold."""
        with self._lock:
            for name, delta in deltas.items():
                self._values[name] += delta

    def set(self, **values: Any) -> None:
        """Replace these fields, in one hold (a state, a last value)."""
        with self._lock:
            for name, value in values.items():
                if name not in self._values:
                    raise AttributeError(f"{self._kind.__name__} has no field {name}")
                self._values[name] = value

    def raise_to(self, name: str, value: int) -> None:
        """Keep the larger of ``name`` and ``value`` (a high-water mark)."""
        with self._lock:
            self._values[name] = max(self._values[name], value)

    def snapshot(self) -> S:
        """The frozen statistics of this moment."""
        with self._lock:
            values = dict(self._values)
        return self._kind(**values)

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["_values"][name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"use set({name}=...) or add({name}=...): changes hold the lock")
