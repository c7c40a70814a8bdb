"""The green-concurrency module, and that it is the only one touching eventlet."""

import pathlib
import re

import pytest

from compute_agent import green

ROOT = pathlib.Path(__file__).resolve().parents[2] / "compute_agent"


def _ticker(stop_after: float) -> list[float]:
    lates = []

    def tick():
        end = green.monotonic() + stop_after
        while green.monotonic() < end:
            asked = green.monotonic()
            green.sleep(0.01)
            lates.append(green.monotonic() - asked - 0.01)

    gt = green.spawn(tick)
    return lates, gt


def test_execute_runs_blocking_calls_off_the_hub():
    lates, gt = _ticker(0.5)
    green.execute(green.native_sleep, 0.4)
    gt.wait()
    assert max(lates) < 0.03


def test_blocking_on_the_hub_is_visible():
    # The control: the same call made on the hub stalls every greenthread.
    lates, gt = _ticker(0.5)
    green.sleep(0.02)
    green.native_sleep(0.2)
    gt.wait()
    assert max(lates) > 0.15


def test_proxy_autowraps_returned_objects():
    class Inner:
        def block(self):
            green.native_sleep(0.3)
            return "inner"

    class Outer:
        def child(self):
            return Inner()

    outer = green.proxy(Outer(), autowrap=(Inner,))
    child = outer.child()
    lates, gt = _ticker(0.4)
    assert child.block() == "inner"
    gt.wait()
    assert max(lates) < 0.03
    assert isinstance(green.unproxy(child), Inner)


def test_event_and_future():
    ev = green.Event()
    assert not ev.wait(0.01)
    green.spawn_after(0.02, ev.set)
    assert ev.wait(1)
    ev.clear()
    assert not ev.is_set()

    fut = green.Future()
    with pytest.raises(TimeoutError):
        fut.result(0.01)
    fut.set_result(5)
    fut.set_result(6)  # a second result is ignored
    assert fut.result() == 5 and fut.done()
    bad = green.Future()
    bad.set_exception(ValueError("x"))
    with pytest.raises(ValueError):
        bad.result(0)


def test_spawned_threads_are_named():
    names = []
    green.spawn(lambda: names.append(green.current_name()), name="worker").wait()
    assert names == ["worker"]


def test_only_green_module_imports_eventlet():
    offenders = []
    for path in ROOT.rglob("*.py"):
        text = path.read_text()
        if re.search(r"^\s*(import|from)\s+(eventlet|greenlet)\b", text, re.M):
            if path.name != "_green_eventlet.py":  # the eventlet backend of green.py
                offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []


STUCK_CALL = """
import sys
from compute_agent import green
green.monkey_patch()
if sys.argv[1] == "abandon":
    green.exit_without_joining_native_threads()
never = green.native_event()
green.spawn(green.execute, never.wait)  # a C call that never returns
green.sleep(0.2)
print("stuck", flush=True)
"""


@pytest.mark.parametrize("abandon", [True, False])
def test_a_stuck_native_call_does_not_keep_the_process_alive(abandon):
    """A libvirt call to a frozen QEMU never returns; a stopped agent must still exit."""
    import subprocess
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-c", STUCK_CALL, "abandon" if abandon else "join"],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT.parent,
    )
    try:
        rc = proc.wait(10 if abandon else 2)
    except subprocess.TimeoutExpired:
        rc = None  # eventlet's exit hook is joining the stuck thread
    finally:
        proc.kill()
        out, _ = proc.communicate()
    assert out == "stuck\n"
    assert rc == (0 if abandon else None)
