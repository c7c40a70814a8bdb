"""The green-concurrency module, and that it is the only one touching eventlet."""

import array
import ast
import errno
import fcntl
import inspect
import os
import pathlib
import re
import socket
import sys
import termios
import threading

import pytest

from compute_agent import green

ROOT = pathlib.Path(__file__).resolve().parents[2] / "compute_agent"
# Tests of the hub itself; the rest run under both backends (`make test`).
eventlet_only = pytest.mark.skipif(green.BACKEND != "eventlet", reason="needs the eventlet hub")


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
    # On the hub the call stalls a tick 0.4 s (the control below); a loaded
    # 2-core machine delays one by 30 ms now and then (seen beside a benchmark).
    assert max(lates) < 0.15


@eventlet_only
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


@eventlet_only
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


SIGNAL_WHILE_ASLEEP = """
import os, signal, sys, time
from compute_agent import green
green.monkey_patch()
ran = []
done = green.Event()
def mark():  # the time is taken when the spawned task runs
    ran.append(time.monotonic())
    done.set()
def on_signal(*_):
    green.spawn(mark, name="sig")
signal.signal(signal.SIGUSR1, on_signal)
if sys.argv[1] == "wake":
    green.wake_on_signals()
sent = []
def send():
    time.sleep(0.3)
    sent.append(time.monotonic())
    os.kill(os.getpid(), signal.SIGUSR1)  # to the process, as systemd's SIGTERM
green.native_thread(send, name="sender")
done.wait(4)  # the hub (or the main thread) has nothing else to wake for
print(round(ran[0] - sent[0], 3), flush=True)
"""


def _signal_to_task_s(mode: str) -> float:
    import subprocess

    out = subprocess.run(
        [sys.executable, "-c", SIGNAL_WHILE_ASLEEP, mode],
        capture_output=True, text=True, cwd=ROOT.parent, timeout=30, check=True,
    ).stdout
    return float(out)


def test_a_signal_handlers_task_runs_at_once_not_at_the_next_timer():
    """A SIGTERM to an idle eventlet agent waited up to 0.5 s for the hub's poll to end."""
    assert _signal_to_task_s("wake") < 1.0  # typically a few ms; 3.7 s when it waits


@eventlet_only
def test_without_the_wakeup_the_hub_sleeps_through_a_signal():
    """The control: the bound above separates the two cases on this machine."""
    assert _signal_to_task_s("plain") > 3.0


def test_call_later_cancelled_before_its_start_never_runs():
    ran = []
    task = green.call_later(0.05, ran.append, 1, name="late")
    task.cancel()
    green.sleep(0.1)
    assert ran == [] and task.done()
    with pytest.raises(green.Cancelled):
        task.result(1)


def test_result_timeout_leaves_the_work_running():
    release = green.Event()
    task = green.submit(lambda: release.wait(5) and "finished", name="slow")
    with pytest.raises(TimeoutError):
        task.result(0.05)
    assert not task.done()
    release.set()
    assert task.result(1) == "finished"


def test_result_raises_the_work_exception():
    def fail():
        raise ValueError("boom")

    task = green.submit(fail, name="failing")
    with pytest.raises(ValueError, match="boom"):
        task.result(1)
    assert task.done()


def test_done_callbacks_run_once_even_when_added_late():
    seen = []
    task = green.spawn(lambda: 5, name="quick")
    task.add_done_callback(seen.append)
    assert task.result(1) == 5
    green.sleep(0.01)
    task.add_done_callback(seen.append)  # already done: called at once
    green.sleep(0.01)
    assert seen == [task, task]
    assert task.name == "quick"


def test_cancel_raises_cancelled_inside_the_task_at_its_next_wait():
    entered, cleaned = green.Event(), []
    never = green.Event()

    def work():
        entered.set()
        try:
            never.wait()
        except green.Cancelled:
            cleaned.append(green.current_name())
            raise

    task = green.spawn(work, name="doomed")
    assert entered.wait(1)
    task.cancel()
    with pytest.raises(green.Cancelled):
        task.result(1)
    assert cleaned == ["doomed"]


def test_a_cancelled_sleep_and_semaphore_acquire_end_at_once():
    sem = green.Semaphore(1)
    sem.acquire()
    sleeper = green.spawn(green.sleep, 30, name="sleeper")
    waiter = green.spawn(sem.acquire, name="waiter")
    green.sleep(0.02)
    started = green.monotonic()
    for task in (sleeper, waiter):
        task.cancel()
        with pytest.raises(green.Cancelled):
            task.result(2)
    assert green.monotonic() - started < 1
    sem.release()


@eventlet_only  # threads start when the OS runs them: no order is promised
def test_a_burst_of_spawns_starts_in_the_order_spawned():
    for _ in range(5):
        arrived: list[int] = []
        release = green.Event()

        def arrive(i: int, arrived: list[int], release: green.Event) -> None:
            arrived.append(i)
            release.wait()

        tasks = [green.spawn(arrive, i, arrived, release) for i in range(8)]
        green.sleep(0.1)
        assert arrived == list(range(8))
        release.set()
        for task in tasks:
            task.wait()


def test_a_cancelled_task_has_cleaned_up_once_its_result_says_cancelled():
    # cancel() itself promises nothing about when; waiting for the result does, on both.
    for _ in range(20):
        cleaned: list[str] = []
        never, waiting = green.Event(), green.Event()

        def work(cleaned: list[str], never: green.Event, waiting: green.Event) -> None:
            try:
                waiting.set()
                never.wait()
            finally:
                cleaned.append("done")

        task = green.spawn(work, cleaned, never, waiting)
        assert waiting.wait(5)
        task.cancel()
        with pytest.raises(green.Cancelled):
            task.result(5)
        assert cleaned == ["done"]


def test_a_task_cancelled_before_it_waits_sees_it_at_its_first_wait():
    go, reached = green.native_event(), []

    def work() -> None:
        go.wait()  # a native wait: no switch point, the cancel is not seen here
        reached.append("wait")
        green.Event().wait()
        reached.append("past the wait")

    task = green.spawn(work, name="late")
    task.cancel()
    go.set()
    with pytest.raises(green.Cancelled):
        task.result(5)
    assert reached in ([], ["wait"])  # eventlet: never started; threads: at its wait


@eventlet_only  # under threads every task runs in parallel: no yield is needed to let it
def test_a_yield_outside_any_task_lets_a_spawned_task_run():
    ticks: list[None] = []
    task = green.spawn(lambda: [ticks.append(green.yield_now()) for _ in range(100)])
    for _ in range(5):
        green.yield_now()
    task.cancel()
    assert len(ticks) >= 4


THREADS_IMPORT = """
import logging, sys
from compute_agent import green, periodic, locks, lifecycle, stats, power_sync, log
assert green.BACKEND == "threads", green.BACKEND
done = green.Event()
green.native_thread(lambda: (logging.getLogger("t").warning("from a native thread"), done.set()),
                    name="native")
assert done.wait(5)
print(sorted(m for m in sys.modules if m.split(".")[0] in ("eventlet", "greenlet")))
"""


def test_the_threads_backend_never_imports_eventlet():
    import os
    import subprocess
    import sys

    env = dict(os.environ, COMPUTE_AGENT_CONCURRENCY="threads")
    out = subprocess.run(
        [sys.executable, "-c", THREADS_IMPORT],
        capture_output=True,
        text=True,
        cwd=ROOT.parent,
        env=env,
        timeout=60,
        check=True,
    ).stdout
    assert out == "[]\n"


@eventlet_only
def test_naming_a_native_thread_creates_no_hub_in_it():
    """A log line from a native thread (libvirt's loop, the pool) reads the task name."""
    import eventlet.hubs

    seen = []

    def native():
        seen.append(green.current_name())
        seen.append(getattr(eventlet.hubs._threadlocal, "hub", None))

    green.native_thread(native, name="n").join(5)
    assert seen == ["native", None]


def _names_used_through_green() -> set[str]:
    """Every ``green.<name>`` the package, its tests and bench use."""
    root = pathlib.Path(__file__).resolve().parents[2]
    used: set[str] = set()
    for folder in ("compute_agent", "tests", "bench"):
        for path in (root / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if (
                    isinstance(node, ast.Attribute)
                    and isinstance(node.value, ast.Name)
                    and node.value.id == "green"
                ):
                    used.add(node.attr)
    return used


@eventlet_only  # it imports both backends; the threads run must not load eventlet
def test_both_backends_provide_every_name_the_agent_uses():
    """One API: whatever code reaches through ``green`` exists in both implementations."""
    import compute_agent._green_eventlet as eventlet_backend
    import compute_agent._green_threads as threads_backend

    used = _names_used_through_green() - {"BACKEND", "BACKEND_VARIABLE"}
    assert len(used) > 30
    for backend in (eventlet_backend, threads_backend):
        assert sorted(n for n in used if not hasattr(backend, n)) == [], backend.__name__
    # Same call shapes: a name that is a function in one is a function in the other.
    for name in sorted(used):
        a, b = getattr(eventlet_backend, name), getattr(threads_backend, name)
        if inspect.isfunction(a) and inspect.isfunction(b):
            assert list(inspect.signature(a).parameters) == list(inspect.signature(b).parameters), (
                name
            )


def test_recv_by_returns_what_was_sent_and_times_out_at_its_deadline():
    a, b = socket.socketpair()
    try:
        a.sendall(b"line\n")
        assert green.recv_by(b, 100, green.monotonic() + 5) == b"line\n"
        started = green.monotonic()
        with pytest.raises(TimeoutError):
            green.recv_by(b, 100, started + 0.2)
        assert 0.15 <= green.monotonic() - started < 5
        a.close()
        assert green.recv_by(b, 100, green.monotonic() + 5) == b""  # the peer closed
    finally:
        a.close()
        b.close()


def test_send_by_sends_all_and_times_out_when_the_peer_never_reads():
    a, b = socket.socketpair()
    try:
        green.send_by(a, b"x" * 1000, green.monotonic() + 5)
        assert b.recv(2000) == b"x" * 1000
        started = green.monotonic()
        with pytest.raises(TimeoutError):
            green.send_by(a, b"x" * 50_000_000, started + 0.2)  # more than the buffers hold
        assert 0.15 <= green.monotonic() - started < 5
    finally:
        a.close()
        b.close()


@pytest.mark.skipif(
    green.BACKEND != "threads", reason="the hub waits for a green socket itself: no poll to set up"
)
def test_a_socket_closed_by_another_thread_while_a_read_waits_is_an_oserror():
    """An evicted admin connection: closed by the accepting thread between its
    task's read (nothing yet) and the poll. It was a ValueError (file
    descriptor -1) that escaped the server's OSError handling as a traceback."""
    a, b = socket.socketpair()

    class ClosedMeanwhile(socket.socket):
        def fileno(self):
            if sys._getframe(1).f_code.co_name == "_wait_ready":  # the poll's registration
                self.close()  # another thread's close, just after the read found nothing
            return super().fileno()

    s = ClosedMeanwhile(b.family, b.type, fileno=b.detach())
    try:
        with pytest.raises(OSError) as raised:
            green.recv_by(s, 100, green.monotonic() + 5)
        assert raised.type is OSError and raised.value.errno == errno.EBADF
    finally:
        a.close()
        s.close()


@pytest.mark.skipif(
    green.BACKEND != "threads", reason="a green socket's calls are the hub's: no GIL hand-over"
)
def test_what_is_ready_moves_without_the_socket_modules_calls_which_give_up_the_gil():
    """socket.recv/send release the GIL around each system call: under load
    the thread then waits for it behind every busy thread. recv_by and
    send_by move what is ready without them, a reply larger than the
    socket's buffers included."""

    class NoGilRelease(socket.socket):
        def recv(self, *args):
            raise AssertionError("socket.recv gives up the GIL")

        def send(self, *args):
            raise AssertionError("socket.send gives up the GIL")

    a, b = socket.socketpair()
    a = NoGilRelease(a.family, a.type, fileno=a.detach())
    b = NoGilRelease(b.family, b.type, fileno=b.detach())
    big = bytes(range(256)) * 20_000  # 5 MB: several waits for room
    got = bytearray()

    def read_all():
        while len(got) < len(big):
            got.extend(green.recv_by(b, 65536, green.monotonic() + 30))

    try:
        reader = green.submit(read_all, name="reader")
        green.send_by(a, big, green.monotonic() + 30)
        reader.result(30)
        assert bytes(got) == big
        b.close()
        with pytest.raises(OSError) as raised:
            green.send_by(a, b"x" * 300_000, green.monotonic() + 5)  # a closed peer
        assert raised.value.errno in (errno.EPIPE, errno.ECONNRESET)
    finally:
        a.close()
        b.close()


def test_start_soon_runs_the_task_without_its_caller_starting_a_thread():
    """The admin socket's last accepter starts its successor this way before
    serving: Thread.start() would wait for the new thread to run, two waits
    for the GIL under load."""
    started: list[str] = []

    def watch(frame, event, arg):
        if event == "call" and frame.f_code.co_name == "start" and "self" in frame.f_locals:
            if isinstance(frame.f_locals["self"], threading.Thread):
                started.append(frame.f_locals["self"].name)

    ran = green.Event()
    seen: list[tuple[str, str]] = []

    def task(value):
        seen.append((value, green.current_name()))
        ran.set()

    green.start_soon(task, "warm-up", name="first")  # the starter thread's own start
    assert ran.wait(10)
    ran.clear()
    sys.setprofile(watch)
    try:
        handle = green.start_soon(task, "value", name="started-soon")
    finally:
        sys.setprofile(None)
    assert started == []
    assert ran.wait(10)
    handle.result(10)
    assert seen[-1] == ("value", "started-soon")


def test_a_put_after_close_is_dropped_and_writes_to_no_other_file():
    """A libvirt close callback came after Host.stop closed its queue: the put's byte
    went to the pipe's old descriptor number, by then perhaps another file's."""
    queue = green.NativeQueue()
    queue.put("before")
    assert queue.get(1) == "before"
    queue.close()
    r, w = os.pipe()  # takes the lowest free numbers: likely the queue's old ones
    try:
        done = green.native_event()
        green.native_thread(lambda: (queue.put("late"), done.set()), name="late-put")
        assert done.wait(5)
        waiting = array.array("i", [0])
        fcntl.ioctl(r, termios.FIONREAD, waiting)  # never waits, on either backend
        assert waiting[0] == 0  # nothing arrived
        with pytest.raises(green.QueueEmpty):
            queue.get(0.01)
    finally:
        os.close(r)
        os.close(w)
