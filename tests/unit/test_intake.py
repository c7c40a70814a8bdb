"""The intake gate (slots, arrival order, killed waiters) and the refusal log (one line a burst)."""

import logging

import pytest

from compute_agent import exception, green
from compute_agent.dispatch import Dispatcher
from compute_agent.intake import IntakeGate, RefusalLog
from compute_agent.states import ActionSource
from tests.helpers import eventually


def _lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    """This test's logger only: another test's leftover thread may log meanwhile."""
    return [r.getMessage() for r in caplog.records if r.name == "test.refusals"]


def _hold(gate: IntakeGate, name: str, order: list[str], release: green.Event) -> None:
    with gate.admit():
        order.append(name)
        release.wait()


def _arrive(gate: IntakeGate, name: str, order: list[str], release: green.Event) -> green.Task:
    """Send ``name`` to the gate and wait until it holds a slot or a place in the queue.

    One at a time, so that arrival order is the order of these calls on
    either backend (threads start in any order).
    """
    before = gate.running + gate.waiting
    task = green.spawn(_hold, gate, name, order, release, name=name)
    eventually(lambda: gate.running + gate.waiting > before, 10, f"{name} at the gate", every=0.002)
    return task


def test_gate_admits_at_most_slots_and_serves_in_arrival_order():
    gate = IntakeGate(2)
    order: list[str] = []
    releases = [green.Event() for _ in range(6)]
    threads = [_arrive(gate, f"r{i}", order, releases[i]) for i in range(6)]
    eventually(lambda: len(order) == 2, 10, "two admitted", every=0.002)
    assert order == ["r0", "r1"]
    assert (gate.running, gate.waiting, gate.max_waiting) == (2, 4, 4)
    # Each leaving request hands its slot to the oldest waiter.
    for i in range(4):
        releases[i].set()
        eventually(lambda i=i: len(order) == i + 3, 10, f"r{i + 2} admitted", every=0.002)
    releases[4].set()
    releases[5].set()
    for t in threads:
        t.wait()
    assert order == [f"r{i}" for i in range(6)]
    figures = gate.statistics()
    assert (figures.running, figures.waiting, figures.admitted, figures.done) == (0, 0, 6, 6)


def test_a_newcomer_never_overtakes_waiters():
    gate = IntakeGate(1)
    order: list[str] = []
    release = green.Event()
    first = _arrive(gate, "first", order, release)
    second = _arrive(gate, "second", order, release)
    release.set()  # first leaves; second holds the slot handed to it
    late = green.spawn(_hold, gate, "late", order, release, name="late")
    for t in (first, second, late):
        t.wait()
    assert order == ["first", "second", "late"]


def test_a_killed_waiter_leaves_the_queue_and_the_slot_is_not_lost():
    gate = IntakeGate(1)
    order: list[str] = []
    release = green.Event()
    holder = _arrive(gate, "holder", order, release)
    doomed = _arrive(gate, "doomed", order, release)
    assert gate.waiting == 1
    green.kill(doomed)
    with pytest.raises(green.Cancelled):
        doomed.result(10)
    assert gate.waiting == 0
    release.set()
    holder.wait()
    after = green.spawn(_hold, gate, "after", order, release, name="after")
    after.wait()
    assert order == ["holder", "after"]
    assert gate.running == 0


def test_an_error_in_the_block_frees_the_slot():
    gate = IntakeGate(1)
    with pytest.raises(ValueError), gate.admit():
        raise ValueError("boom")
    assert gate.running == 0 and gate.done == 1


def test_gate_needs_a_slot():
    with pytest.raises(exception.InvalidInput):
        IntakeGate(0)


def test_refusal_log_logs_the_first_then_one_line_per_window(caplog):
    caplog.set_level(logging.INFO)
    log = RefusalLog(logging.getLogger("test.refusals"), window=0.1)
    errors = [exception.InstanceNotFound(f"u{i}") for i in range(500)]
    for error in errors:
        log.refused("cast", "stop_instance", error)
    log.refused("cast", "build_instance", exception.InvalidInput("bad"))
    log.refused("call", "stop_instance", exception.InvalidInput("x"), logging.INFO)
    green.sleep(0.3)
    lines = _lines(caplog)
    assert lines == [
        f"RPC cast stop_instance refused: InstanceNotFound: {errors[0]}",
        "RPC cast build_instance refused: InvalidInput: bad",
        "RPC call stop_instance refused: InvalidInput: x",
        "refused 499 more casts of stop_instance in the last 0 s: InstanceNotFound "
        f"(last: {errors[-1]})",
    ]
    assert log.total == 502
    # A new window starts with a line in full again.
    log.refused("cast", "stop_instance", exception.InvalidInput("again"))
    assert _lines(caplog)[-1].endswith("InvalidInput: again")
    log.stop()


def test_refusal_log_stop_flushes_what_is_counted(caplog):
    caplog.set_level(logging.INFO)
    log = RefusalLog(logging.getLogger("test.refusals"), window=60)
    for _ in range(3):
        log.refused("cast", "stop_instance", exception.InstanceNotFound("gone"))
    log.stop()
    assert _lines(caplog)[-1].startswith("refused 2 more casts of stop_instance")


class _Manager:
    host = "h"

    def __init__(self, gate_seen: list[int], gate: IntakeGate) -> None:
        self.gate_seen = gate_seen
        self.gate = gate

    def stop_instance(self, uuid, source):
        self.gate_seen.append(self.gate.running)
        return {"uuid": uuid}


def test_dispatcher_gates_work_but_never_ping():
    gate = IntakeGate(1)
    seen: list[int] = []
    dispatcher = Dispatcher(_Manager(seen, gate), None, intake=gate)
    release = green.Event()
    blocker = green.spawn(_hold, gate, "blocker", [], release, name="blocker")
    green.sleep(0.01)
    # The gate is full: a ping still answers at once.
    assert dispatcher.call("ping", {}, ActionSource.RPC)["host"] == "h"
    stop = green.spawn(
        dispatcher.call, "stop_instance", {"instance_uuid": "u"}, ActionSource.RPC, name="stop"
    )
    green.sleep(0.02)
    assert seen == [] and gate.waiting == 1
    release.set()
    assert stop.wait() == {"uuid": "u"}
    blocker.wait()
    assert seen == [1]
