"""A component's counters: exact from many threads, read as its frozen statistics."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest

from compute_agent.counters import Counters
from compute_agent.lifecycle import EventStatistics
from compute_agent.operations import BuildStatistics
from compute_agent.resume import ResumeStatistics
from tests.unit.hammer import THREADS, WRITES, hammer


@dataclass(frozen=True)
class Sample:
    done: int = 0
    failed: int = 0
    peak: int = 0
    state: str = "idle"
    last_s: float | None = None


def test_starts_at_the_statistics_defaults_and_snapshots_are_frozen():
    counters = Counters(Sample, state="ready")
    first = counters.snapshot()
    assert first == Sample(state="ready")
    counters.add(done=2, failed=1)
    counters.set(state="busy", last_s=0.5)
    assert first == Sample(state="ready")  # a snapshot does not move with the counters
    assert counters.snapshot() == Sample(done=2, failed=1, state="busy", last_s=0.5)
    assert (counters.done, counters.state) == (2, "busy")
    with pytest.raises(dataclasses.FrozenInstanceError):
        first.done = 5  # type: ignore[misc]


def test_every_component_statistics_can_be_counted():
    """Each component's statistics class names its fields and their starts: nothing copied."""
    for kind in (BuildStatistics, EventStatistics, ResumeStatistics):
        assert Counters(kind).snapshot() == kind()


def test_refuses_what_it_does_not_hold():
    @dataclass(frozen=True)
    class NoStart:
        count: int

    with pytest.raises(TypeError, match="needs a default"):
        Counters(NoStart)
    with pytest.raises(TypeError, match="no field nope"):
        Counters(Sample, nope=1)
    counters = Counters(Sample)
    with pytest.raises(AttributeError, match="no field nope"):
        counters.set(nope=1)
    with pytest.raises(AttributeError, match="hold the lock"):
        counters.done = 3  # plain assignment would be an unguarded read-modify-write
    with pytest.raises(AttributeError):
        _ = counters.nope


def test_counts_every_change_from_many_threads():
    counters = Counters(Sample)
    torn: list[Sample] = []

    def work(i: int) -> None:
        for n in range(WRITES):
            counters.add(done=1, failed=1)
            counters.raise_to("peak", i * WRITES + n)
            if n % 100 == 0:
                snap = counters.snapshot()
                if snap.done != snap.failed:  # both changed in one hold
                    torn.append(snap)

    hammer(work)
    assert torn == []
    final = counters.snapshot()
    assert (final.done, final.failed) == (THREADS * WRITES, THREADS * WRITES)
    assert final.peak == THREADS * WRITES - 1
