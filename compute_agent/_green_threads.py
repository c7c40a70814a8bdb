"""The native-threads backend of :mod:`compute_agent.green` (``concurrency_backend = threads``).

Import :mod:`compute_agent.green`, never this module. Each task is a daemon
``threading.Thread``; nothing is promised about the order in which tasks
start or run. Cancelling one sets its flag and wakes it if it waits at a
switch point (``sleep``, ``yield_now``, a wait on an ``Event``, ``Future``,
``Task`` or ``NativeQueue``, a ``Semaphore`` acquire), where
:class:`Cancelled` is raised; ``cancel`` returns at once (wait on the task
to know it ended). There is no hub: ``execute`` and ``proxy`` are direct
calls, ``monkey_patch`` does nothing, and no switch tracer exists.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import errno
import logging
import os
import queue as _queue
import select as _select
import socket as _socket
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

_LOG = logging.getLogger(__name__)

BACKEND = "threads"
HAS_HUB = False  # every task is its own thread: nothing to measure the lag of
RPC_EXECUTOR = "threading"
QueueEmpty = _queue.Empty


class Cancelled(BaseException):
    """Raised inside a task at its next switch point once it is cancelled."""


_local = threading.local()


def current_task() -> Task | None:
    """The Task running the caller, or None (the main thread, a library's thread)."""
    return getattr(_local, "task", None)


def _check_cancelled() -> None:
    task = current_task()
    if task is not None and task._cancelled.is_set():
        raise Cancelled()


def _wait(cond: threading.Condition, ready: Callable[[], bool], timeout: float | None) -> bool:
    """Wait (``cond`` held) until ``ready()``; False on timeout; Cancelled if the task is.

    The task names ``cond`` as what it waits on before it checks its flag,
    and ``cancel`` sets the flag before it reads that name: either the
    check sees the flag or ``cancel`` wakes the wait.
    """
    task = current_task()
    if task is not None:
        task._blocker = cond
    try:
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            if task is not None and task._cancelled.is_set():
                raise Cancelled()
            if ready():
                return True
            left = None if end is None else end - time.monotonic()
            if left is not None and left <= 0:
                return False
            cond.wait(left)
    finally:
        if task is not None:
            task._blocker = None


class Task:
    """A call running (or due to run) in its own daemon thread."""

    def __init__(
        self,
        delay: float,
        fn: Callable[..., Any],
        args: Any,
        kwargs: Any,
        name: str,
        quiet: bool = False,
        own_thread: bool = True,
    ) -> None:
        """``own_thread=False``: the caller runs :meth:`_run` in a thread it has (a Pool's)."""
        self.task_name = name
        self._quiet = quiet
        self._call: Any = (delay, fn, args, kwargs)
        self._cond = threading.Condition(threading.Lock())
        self._finished = False
        self._value: Any = None
        self._error: BaseException | None = None
        self._callbacks: list[Callable[[Task], Any]] = []
        self._cancelled = threading.Event()  # also ends a sleep at once
        self._blocker: threading.Condition | None = None  # what the task waits on
        if own_thread:
            threading.Thread(target=self._run, name=name, daemon=True).start()

    @property
    def name(self) -> str:
        return self.task_name

    def _run(self) -> None:
        (delay, fn, args, kwargs), self._call = self._call, None
        outer, _local.task = current_task(), self
        try:
            # Cancelled before its start (or its delay's end): it never runs.
            if self._cancelled.wait(delay) if delay > 0 else self._cancelled.is_set():
                raise Cancelled()
            value = fn(*args, **kwargs)
        except BaseException as exc:
            self._finish(None, exc)
            if not (self._quiet or isinstance(exc, Cancelled)):
                raise  # printed by threading.excepthook, as the hub prints it
        else:
            self._finish(value, None)
        finally:
            _local.task = outer

    def _finish(self, value: Any, error: BaseException | None) -> None:
        with self._cond:
            self._value, self._error, self._finished = value, error, True
            callbacks, self._callbacks = self._callbacks, []
            self._cond.notify_all()
        for fn in callbacks:
            fn(self)

    def cancel(self) -> None:
        """Raise :class:`Cancelled` in the task at its next switch point (unstarted: never runs).

        Returns at once; ``result()`` says when the task has ended.
        """
        if self._finished:
            return
        self._cancelled.set()
        blocker = self._blocker
        if blocker is not None and current_task() is not self:
            with blocker:
                blocker.notify_all()

    kill = cancel

    def done(self) -> bool:
        return self._finished

    @property
    def dead(self) -> bool:
        return self._finished

    def result(self, timeout: float | None = None) -> Any:
        """The call's return value; raise its exception, ``Cancelled``, or TimeoutError.

        On timeout the call goes on running: cancel it to stop it.
        """
        with self._cond:
            if not _wait(self._cond, lambda: self._finished, timeout):
                raise TimeoutError(f"{self.task_name}: no result within {timeout} s")
        if self._error is not None:
            raise self._error
        return self._value

    def wait(self) -> Any:
        return self.result()

    def add_done_callback(self, fn: Callable[[Task], Any]) -> None:
        """Call ``fn(task)`` once the task ends (at once, if it has)."""
        with self._cond:
            if not self._finished:
                self._callbacks.append(fn)
                return
        fn(self)

    link = add_done_callback


def spawn(fn: Callable[..., Any], *args: Any, name: str | None = None, **kwargs: Any) -> Task:
    """Start ``fn`` in a new thread named ``name``."""
    return Task(0, fn, args, kwargs, name or str(getattr(fn, "__name__", "task")))


def start_soon(fn: Callable[..., Any], *args: Any, name: str) -> Task:
    """Start ``fn`` in a new thread, without waiting for that thread to run.

    ``Thread.start()`` waits until the new thread runs: under load, two waits
    for the GIL behind every busy thread (1-3 ms under admin_boots). Here a
    long-lived starter thread takes that wait, so a caller on a latency path
    (the admin socket's last accepter) goes on at once.
    """
    task = Task(0, fn, args, {}, name, own_thread=False)
    with _starter_guard:
        global _starter
        if _starter is None or not _starter.is_alive():
            _starter = threading.Thread(target=_start_threads, name="task-starter", daemon=True)
            _starter.start()
    _to_start.put(task)
    return task


_to_start: _queue.SimpleQueue[Task] = _queue.SimpleQueue()
_starter: threading.Thread | None = None
_starter_guard = threading.Lock()


def _start_threads() -> None:
    while True:
        task = _to_start.get()
        try:
            threading.Thread(target=task._run, name=task.task_name, daemon=True).start()
        except Exception as exc:  # noqa: BLE001 - that task fails, never the next ones
            _LOG.error("cannot start a thread for task %s: %s", task.task_name, exc)
            with contextlib.suppress(Exception):
                task._finish(None, exc)


def submit(fn: Callable[..., Any], *args: Any, name: str) -> Task:
    """Start ``fn`` whose outcome only its :meth:`Task.result` reports (no traceback printed)."""
    return Task(0, fn, args, {}, name, quiet=True)


def call_later(seconds: float, fn: Callable[..., Any], *args: Any, name: str | None = None) -> Task:
    """Start ``fn`` after ``seconds``; ``cancel()`` before then and it never runs."""
    return Task(seconds, fn, args, {}, name or str(getattr(fn, "__name__", "timer")))


spawn_after = call_later


def kill(task: Task) -> None:
    task.cancel()


def sleep(seconds: float = 0) -> None:
    """Sleep this thread; a cancelled task wakes at once with Cancelled.

    ``sleep(0)`` (``yield_now``) only checks for a cancel: the interpreter
    already switches threads every few milliseconds, and a real sleep(0)
    (a system call handing the CPU away) cost 90 µs per instance synced.
    """
    task = current_task()
    if task is None:
        if seconds > 0:
            time.sleep(seconds)
        return
    if seconds > 0 and task._cancelled.wait(seconds):
        raise Cancelled()
    _check_cancelled()


def yield_now() -> None:
    sleep(0)


def monkey_patch() -> None:
    """Nothing to patch: the standard library already blocks only the calling thread."""


def greenlet_name(glet: Any) -> str:
    return str(getattr(glet, "name", "thread"))


def current_name() -> str:
    task = current_task()
    if task is not None:
        return task.task_name
    thread = threading.current_thread()
    return "main" if thread is threading.main_thread() else thread.name


def name_current(name: str) -> None:
    """Label the running task or thread, e.g. a pooled worker taking on a request."""
    task = current_task()
    if task is not None:
        task.task_name = name
    threading.current_thread().name = name


_pool_size = 20


def set_native_threads(count: int) -> None:
    """Recorded only: blocking calls run in the calling thread."""
    global _pool_size
    _pool_size = count


def exit_without_joining_native_threads() -> None:
    """Nothing to do: every thread started here is a daemon thread."""


def native_threads() -> int:
    return _pool_size


def execute(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a blocking call: in this backend, in the calling thread."""
    return fn(*args, **kwargs)


def proxy(obj: Any, autowrap: tuple[type, ...] = ()) -> Any:
    return obj


def unproxy(obj: Any) -> Any:
    return obj


def wake_on_signals() -> None:
    """Nothing to do: a handler runs when the main thread's wait is interrupted.

    Under eventlet the hub's poll would sleep on; here the main thread waits
    on a lock or a sleep, which a signal interrupts (PEP 475), and a task the
    handler spawns is a thread of its own that starts at once.
    """


def native_sleep(seconds: float) -> None:
    """Block the calling thread, as a slow C call would (not a switch point)."""
    time.sleep(seconds)


def native_thread(fn: Callable[..., Any], *args: Any, name: str) -> Any:
    t = threading.Thread(target=fn, args=args, name=name, daemon=True)
    t.start()
    return t


def native_event() -> Any:
    return threading.Event()


def native_thread_id() -> int:
    return threading.get_ident()


def native_lock() -> Any:
    return threading.Lock()


def native_semaphore(count: int) -> Any:
    return threading.BoundedSemaphore(count)


def native_local() -> Any:
    return threading.local()


def native_queue() -> Any:
    return _queue.SimpleQueue()


def native_socket_module() -> Any:
    return _socket


def native_select_module() -> Any:
    return _select


def monotonic() -> float:
    return time.monotonic()


def recv_by(sock: _socket.socket, size: int, deadline: float) -> bytes:
    """Up to ``size`` bytes from ``sock`` by ``deadline``, else TimeoutError.

    What the peer already sent is read without giving up the GIL (see
    _held_call); only a wait for more does, in poll().
    """
    _no_timeout(sock)
    while True:
        data = _recv_now(sock, size, _socket.MSG_DONTWAIT)
        if data is not None:
            return data
        _wait_ready(sock, _select.POLLIN, deadline)


def send_by(sock: _socket.socket, data: bytes, deadline: float) -> None:
    """All of ``data`` (bytes only) to ``sock`` by ``deadline``; what fits goes holding the GIL.

    See recv_by. ``data`` keeps the bytes that the pointer passed to libc names alive.
    """
    _no_timeout(sock)
    start = ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value or 0
    done = 0
    while done < len(data):
        sent = _held_call(
            _c_send, sock, start + done, len(data) - done, _socket.MSG_DONTWAIT | _NOSIGNAL
        )
        if sent is None:
            _wait_ready(sock, _select.POLLOUT, deadline)
        else:
            done += sent


# libc's recv and send called through ctypes.PyDLL, which keeps the GIL for
# the call: with MSG_DONTWAIT neither can block. socket.recv and send give up
# the GIL around every system call, and each time the thread then waits for it
# again behind every busy thread (under admin_boots the slowest 5 % of admin
# requests took 0.8-1.4 ms for their one read, against 0.11 ms on eventlet):
# a request line already sent and a reply that fits the socket's buffer cost
# no such wait now. The descriptor's number is read before the call, and the
# GIL may change hands in between: a socket in use by a task must be closed by
# that task only (another thread shuts it down), or its number could name the
# next accepted connection by then.
_libc = ctypes.PyDLL(None, use_errno=True)
_c_recv = _libc.recv
_c_recv.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_c_recv.restype = ctypes.c_ssize_t
_c_send = _libc.send
_c_send.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_c_send.restype = ctypes.c_ssize_t
_NOSIGNAL = _socket.MSG_NOSIGNAL  # a closed peer is EPIPE, never SIGPIPE


def _held_call(call: Any, sock: _socket.socket, buffer: Any, size: int, flags: int) -> int | None:
    """Bytes moved by one non-blocking ``call`` on ``sock``; None: it would block."""
    while True:
        fd = sock.fileno()
        if fd < 0:
            raise OSError(errno.EBADF, "socket closed")
        done = call(fd, buffer, size, flags)
        if done >= 0:
            return int(done)
        code = ctypes.get_errno()
        if code in (errno.EAGAIN, errno.EWOULDBLOCK):
            return None
        if code != errno.EINTR:
            raise OSError(code, os.strerror(code))


def peek(sock: _socket.socket, size: int) -> bytes:
    """Up to ``size`` bytes the peer sent and nobody read yet, left unread; never waits."""
    return _recv_now(sock, size, _socket.MSG_DONTWAIT | _socket.MSG_PEEK) or b""


def _recv_now(sock: _socket.socket, size: int, flags: int) -> bytes | None:
    """One non-blocking recv holding the GIL; None: nothing there yet."""
    buffer = ctypes.create_string_buffer(size)
    got = _held_call(_c_recv, sock, buffer, size, flags)
    return None if got is None else ctypes.string_at(buffer, got)


def _no_timeout(sock: _socket.socket) -> None:
    """A socket timeout would put a poll before every call: the deadline is ours instead."""
    if sock.gettimeout():
        sock.settimeout(None)


def _wait_ready(sock: _socket.socket, events: int, deadline: float) -> None:
    left = deadline - time.monotonic()
    if left > 0:
        poller = _select.poll()
        try:
            poller.register(sock, events)
        except ValueError:  # closed by another thread since its last call (an evicted connection)
            raise OSError(errno.EBADF, "socket closed while waiting for it") from None
        if poller.poll(left * 1000):
            return
    raise TimeoutError("socket not ready before its deadline")


def set_switch_tracer(tracer: Callable[[str, Any], None] | None) -> Any:
    """No hub, no switches to trace: installs nothing (the hub-lag monitor is idle)."""
    return None


class NativeQueue:
    """Items put by any thread, taken by tasks; ``get`` is a switch point."""

    def __init__(self) -> None:
        self._items: collections.deque[Any] = collections.deque()
        self._cond = threading.Condition(threading.Lock())
        self._closed = False

    def put(self, item: Any) -> None:
        with self._cond:
            if self._closed:
                return
            self._items.append(item)
            self._cond.notify()

    def get(self, timeout: float | None = None) -> Any:
        """The next item; raise QueueEmpty if none came within ``timeout``."""
        with self._cond:
            if not _wait(self._cond, lambda: bool(self._items) or self._closed, timeout):
                raise QueueEmpty()
            if self._items:
                return self._items.popleft()
            raise QueueEmpty()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


class Event:
    """A resettable flag a task can wait on, with an optional timeout."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._flag = False

    def set(self) -> None:
        with self._cond:
            self._flag = True
            self._cond.notify_all()

    def clear(self) -> None:
        with self._cond:
            self._flag = False

    def is_set(self) -> bool:
        return self._flag

    def wait(self, timeout: float | None = None) -> bool:
        """True if set, False if ``timeout`` passed first."""
        with self._cond:
            return _wait(self._cond, lambda: self._flag, timeout)


class Future:
    """The result of work done by another task, delivered once."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._done = False
        self._value: Any = None
        self._error: BaseException | None = None

    def set_result(self, value: Any) -> None:
        with self._cond:
            if not self._done:
                self._value, self._done = value, True
                self._cond.notify_all()

    def set_exception(self, exc: BaseException) -> None:
        with self._cond:
            if not self._done:
                self._error, self._done = exc, True
                self._cond.notify_all()

    def done(self) -> bool:
        return self._done

    def result(self, timeout: float | None = None) -> Any:
        """Wait for the result; raise the work's exception, or TimeoutError."""
        with self._cond:
            if not _wait(self._cond, lambda: self._done, timeout):
                raise TimeoutError(f"no result within {timeout} s")
        if self._error is not None:
            raise self._error
        return self._value


class Semaphore:
    """A counting semaphore whose acquire is a (cancellable) switch point."""

    def __init__(self, value: int = 1) -> None:
        self._cond = threading.Condition(threading.Lock())
        self.counter = value

    def acquire(self, blocking: bool = True, timeout: float | None = None) -> bool:
        with self._cond:
            if not blocking and self.counter <= 0:
                return False
            if not _wait(self._cond, lambda: self.counter > 0, timeout):
                return False
            self.counter -= 1
            return True

    def release(self) -> None:
        with self._cond:
            self.counter += 1
            self._cond.notify()

    def locked(self) -> bool:
        return self.counter <= 0

    def __enter__(self) -> Semaphore:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class Pool:
    """At most ``size`` tasks at once: ``spawn`` waits for room, ``waitall`` for all.

    Tasks run on up to ``size`` threads that take queued tasks one after
    another and end when none is left: a sync of 10,000 instances through a
    pool of 4 starts 4 threads, not 10,000.
    """

    def __init__(self, size: int = 1000) -> None:
        self._size = size
        self._room = Semaphore(size)
        self._lock = threading.Lock()
        self._queue: collections.deque[Task] = collections.deque()
        self._workers = 0
        self._running: set[Task] = set()

    def spawn(self, fn: Callable[..., Any], *args: Any) -> Task:
        self._room.acquire()
        task = Task(0, fn, args, {}, f"{current_name()}-pool", own_thread=False)
        task.add_done_callback(self._discard)
        with self._lock:
            self._running.add(task)
            self._queue.append(task)
            start = self._workers < self._size
            if start:
                self._workers += 1
        if start:
            threading.Thread(target=self._work, name=task.task_name, daemon=True).start()
        return task

    def _work(self) -> None:
        while True:
            with self._lock:  # a worker ends only when it finds nothing queued
                if not self._queue:
                    self._workers -= 1
                    return
                task = self._queue.popleft()
            task._run()

    def _discard(self, task: Task) -> None:
        with self._lock:
            self._running.discard(task)
        self._room.release()

    def waitall(self) -> None:
        while True:
            with self._lock:
                left = list(self._running)
            if not left:
                return
            for task in left:
                try:
                    task.result()
                except Exception:  # noqa: BLE001 - as GreenPool.waitall: errors were printed
                    pass
