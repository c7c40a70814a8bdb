"""The eventlet backend of :mod:`compute_agent.green` (the default).

Import :mod:`compute_agent.green`, never this module: it is the API, and
this is one of its two implementations (the other is ``_green_threads``).
"""

from __future__ import annotations

import atexit
import collections
import signal
import socket as _socket
import sys
import threading
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

# eventlet warns at import that it is in maintenance mode; operators should
# read one clean log, so the notice is filtered before the first import.
warnings.filterwarnings("ignore", message=r"\s*Eventlet is deprecated")
warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"eventlet(\.|$)")
warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"oslo_messaging(\.|$)")

import eventlet  # noqa: E402
import eventlet.event  # noqa: E402
import eventlet.greenpool  # noqa: E402
import eventlet.greenthread  # noqa: E402
import eventlet.hubs  # noqa: E402
import eventlet.patcher  # noqa: E402
import eventlet.queue  # noqa: E402
import eventlet.semaphore  # noqa: E402
import eventlet.timeout  # noqa: E402
import eventlet.tpool  # noqa: E402
import greenlet  # noqa: E402

T = TypeVar("T")

BACKEND = "eventlet"
HAS_HUB = True  # one thread runs every task, switching at I/O and sleeps
Semaphore = eventlet.semaphore.Semaphore
Pool = eventlet.greenpool.GreenPool
QueueEmpty = eventlet.queue.Empty
# What cancelling raises inside the task: eventlet's kill throws GreenletExit.
Cancelled = greenlet.GreenletExit

_native_os = eventlet.patcher.original("os")
_native_time = eventlet.patcher.original("time")
_native_threading = eventlet.patcher.original("threading")
_native_queue = eventlet.patcher.original("queue")
_native_socket = eventlet.patcher.original("socket")
_native_select = eventlet.patcher.original("select")
_MAIN_THREAD = _native_threading.main_thread()


# The oslo.messaging executor for the RPC server. Its "eventlet" executor is
# deprecated; "threading" runs each request in a threading.Thread, which the
# monkey patching below turns into a greenthread, so requests stay green.
RPC_EXECUTOR = "threading"


def monkey_patch() -> None:
    """Patch the standard library for green I/O; entry points call this first."""
    eventlet.monkey_patch()


class Task(eventlet.greenthread.GreenThread):  # type: ignore[misc]
    """A running (or scheduled) call: cancel it, ask whether it is done, wait for its result."""

    task_name: str
    _quiet = False

    @property
    def name(self) -> str:
        return self.task_name

    def main(self, function: Callable[..., Any], args: Any, kwargs: Any) -> None:
        # GreenThread.main, except that a quiet task's failure goes to its
        # waiter only, not to the hub's traceback printer as well.
        try:
            result = function(*args, **kwargs)
        except BaseException:
            self._exit_event.send_exception(*sys.exc_info())
            self._resolve_links()
            if not self._quiet:
                raise
        else:
            self._exit_event.send(result)
            self._resolve_links()

    def cancel(self) -> None:
        """Raise :data:`Cancelled` in the task now; a task not yet started never runs."""
        self.kill()

    def done(self) -> bool:
        return bool(self.dead)

    def result(self, timeout: float | None = None) -> Any:
        """The call's return value; raise its exception, ``Cancelled``, or TimeoutError.

        On timeout the call goes on running: cancel it to stop it.
        """
        if timeout is not None and not self.dead:
            with eventlet.timeout.Timeout(timeout, False):
                return self.wait()
            raise TimeoutError(f"{self.task_name}: no result within {timeout} s")
        return self.wait()

    def add_done_callback(self, fn: Callable[[Task], Any]) -> None:
        """Call ``fn(task)`` once the task ends (at once, if it has)."""
        self.link(lambda gt, *_: fn(gt))


def _start(
    delay: float, fn: Callable[..., Any], args: Any, kwargs: Any, name: str, quiet: bool = False
) -> Task:
    # eventlet.spawn / spawn_after, with our Task class.
    hub = eventlet.hubs.get_hub()
    task = Task(hub.greenlet)
    task.task_name = name
    task._quiet = quiet
    hub.schedule_call_global(delay, task.switch, fn, args, kwargs)
    return task


def spawn(fn: Callable[..., Any], *args: Any, name: str | None = None, **kwargs: Any) -> Task:
    """Start ``fn`` in a new greenthread, labelled so lag reports can name it."""
    return _start(0, fn, args, kwargs, name or str(getattr(fn, "__name__", "greenthread")))


def start_soon(fn: Callable[..., Any], *args: Any, name: str) -> Task:
    """``spawn``: a greenthread's start never waits (see the threads backend)."""
    return _start(0, fn, args, {}, name)


def submit(fn: Callable[..., Any], *args: Any, name: str) -> Task:
    """Start ``fn`` whose outcome only its :meth:`Task.result` reports (no traceback printed)."""
    return _start(0, fn, args, {}, name, quiet=True)


def call_later(seconds: float, fn: Callable[..., Any], *args: Any, name: str | None = None) -> Task:
    """Start ``fn`` after ``seconds``; ``cancel()`` before then and it never runs."""
    return _start(seconds, fn, args, {}, name or str(getattr(fn, "__name__", "timer")))


spawn_after = call_later


def sleep(seconds: float = 0) -> None:
    """Green sleep; ``sleep(0)`` yields to every other ready greenthread."""
    eventlet.sleep(seconds)


def yield_now() -> None:
    eventlet.sleep(0)


def kill(task: Task) -> None:
    task.cancel()


def current_task() -> Task | None:
    """The Task running the caller, or None (the main greenthread, a library's thread)."""
    glet = greenlet.getcurrent()
    return glet if isinstance(glet, Task) else None


def greenlet_name(glet: Any) -> str:
    """The label given at spawn, or 'hub' / 'main' for eventlet's own greenlets."""
    name = getattr(glet, "task_name", None)
    if name:
        return str(name)
    # The calling thread's hub, if it has one: asking eventlet for it would
    # create one in a native thread that logs, say.
    hub = getattr(eventlet.hubs._threadlocal, "hub", None)
    if hub is not None and glet is hub.greenlet:
        return "hub"
    if glet.parent is None:
        return "main" if _native_threading.current_thread() is _MAIN_THREAD else "native"
    # A threading.Thread started by a library (oslo's listener, futurist's
    # workers) is a greenthread once patched, known by its thread's name.
    thread = threading._active.get(id(glet))  # type: ignore[attr-defined]
    return f"thread {thread.name}" if thread is not None else "greenthread"


def current_name() -> str:
    return greenlet_name(greenlet.getcurrent())


def name_current(name: str) -> None:
    """Label the running greenthread, e.g. a pooled worker taking on a request."""
    greenlet.getcurrent().task_name = name


def set_native_threads(count: int) -> None:
    """Size the native thread pool that runs blocking calls; call before the first one.

    Every libvirt call (builds, syncs, events, stats) takes one of these
    threads while it blocks, so the pool bounds how many run at once.
    """
    eventlet.tpool.set_num_threads(count)


def exit_without_joining_native_threads() -> None:
    """Let the process exit while a native thread is stuck in a C call.

    eventlet's exit hook (``tpool.killall``) joins every pool thread with no
    timeout, so one libvirt call that never returns (the first statistics
    call to reach a SIGSTOPped QEMU) kept a stopped agent's process alive
    until the guest thawed. The pool's threads are daemon threads: without
    the hook they are left behind at exit, as a stuck call must be.
    """
    atexit.unregister(eventlet.tpool.killall)


def native_threads() -> int:
    return int(eventlet.tpool._nthreads)


def execute(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a blocking (C-level) call in the native thread pool, not on the hub."""
    result: T = eventlet.tpool.execute(fn, *args, **kwargs)
    return result


def proxy(obj: Any, autowrap: tuple[type, ...] = ()) -> Any:
    """Wrap ``obj`` so every method call runs in the native thread pool.

    Objects of the ``autowrap`` types returned by a call are wrapped as well,
    so that, e.g., a domain returned by a proxied connection is proxied too.
    """
    return eventlet.tpool.Proxy(obj, autowrap=autowrap)


def unproxy(obj: Any) -> Any:
    """The object behind a :func:`proxy` (or ``obj`` itself)."""
    return obj._obj if isinstance(obj, eventlet.tpool.Proxy) else obj


def native_sleep(seconds: float) -> None:
    """Block the calling native thread, as a slow C call would."""
    _native_time.sleep(seconds)


def native_thread(fn: Callable[..., Any], *args: Any, name: str) -> Any:
    """Start a daemon native (OS) thread, e.g. for a C library's event loop."""
    t = _native_threading.Thread(target=fn, args=args, name=name, daemon=True)
    t.start()
    return t


def native_event() -> Any:
    """A threading.Event for native threads (waiting on it blocks the thread)."""
    return _native_threading.Event()


def native_thread_id() -> int:
    """Identity of the calling native thread, whatever greenthread runs on it."""
    return int(_native_threading.get_ident())


def native_lock() -> Any:
    """A lock that is safe between native threads and the hub (never switches)."""
    return _native_threading.Lock()


class NativeQueue:
    """Items put by native threads, taken by greenthreads, through a self-pipe.

    ``put`` is safe from any native thread (a libvirt callback, say) and never
    touches the hub: it appends and writes one byte to a pipe. ``get`` waits
    greenly for the pipe to become readable. A ``put`` after ``close`` is
    dropped: a connection's close callback comes after the queue's close,
    and its byte went to the pipe's old descriptor number, by then perhaps
    another file's (a socket, another pipe).
    """

    def __init__(self) -> None:
        self._items: collections.deque[Any] = collections.deque()
        self._rfd, self._wfd = _native_os.pipe()
        _native_os.set_blocking(self._rfd, False)
        _native_os.set_blocking(self._wfd, False)
        self._closed = False
        # The write end's use and its close, one at a time: held for a
        # system call, never across a switch.
        self._write_guard = _native_threading.Lock()

    def put(self, item: Any) -> None:
        with self._write_guard:
            if self._closed:
                return
            self._items.append(item)
            try:
                _native_os.write(self._wfd, b"!")
            except BlockingIOError:
                pass  # the pipe is full, so the reader is already due to wake

    def get(self, timeout: float | None = None) -> Any:
        """The next item; raise QueueEmpty if none came within ``timeout``."""
        while True:
            try:
                return self._items.popleft()
            except IndexError:
                pass
            if self._closed:
                raise QueueEmpty()
            try:
                eventlet.hubs.trampoline(
                    self._rfd, read=True, timeout=timeout, timeout_exc=QueueEmpty
                )
            except eventlet.hubs.IOClosed:
                raise QueueEmpty() from None
            try:
                while _native_os.read(self._rfd, 4096):
                    pass
            except BlockingIOError:
                pass

    def close(self) -> None:
        with self._write_guard:
            if self._closed:
                return
            self._closed = True
            _native_os.close(self._wfd)
        eventlet.hubs.notify_close(self._rfd)
        _native_os.close(self._rfd)


_signal_wakeup: list[int] = []  # the wake-up pipe's read end, once made


def wake_on_signals() -> None:
    """Have a signal's handler act at once, not at the hub's next timer.

    Python runs a handler on the main thread, here the hub's, between two
    bytecodes: a signal arriving while the hub sleeps in poll runs the
    handler, and poll is then retried for the rest of its timeout (PEP 475),
    so the task the handler spawns waited for the next timer (a SIGTERM was
    acted on up to 0.5 s late). Python also writes each signal's number to
    the wake-up descriptor, here a pipe the hub watches, so the retried poll
    returns at once. Call from the main thread; a second call does nothing.
    """
    if _signal_wakeup:
        return
    rfd, wfd = _native_os.pipe2(_native_os.O_NONBLOCK | _native_os.O_CLOEXEC)
    signal.set_wakeup_fd(wfd, warn_on_full_buffer=False)
    _signal_wakeup.append(rfd)

    def drain() -> None:
        while True:
            eventlet.hubs.trampoline(rfd, read=True)
            try:
                while _native_os.read(rfd, 512):
                    pass
            except BlockingIOError:
                pass  # drained: the handlers themselves already ran

    spawn(drain, name="signal-wakeup")


class Event:
    """A resettable flag a greenthread can wait on, with an optional timeout."""

    def __init__(self) -> None:
        self._ev = eventlet.event.Event()

    def set(self) -> None:
        if not self._ev.ready():
            self._ev.send(True)

    def clear(self) -> None:
        if self._ev.ready():
            self._ev.reset()

    def is_set(self) -> bool:
        return bool(self._ev.ready())

    def wait(self, timeout: float | None = None) -> bool:
        """True if set, False if ``timeout`` passed first."""
        if self._ev.ready():
            return True
        return bool(self._ev.wait(timeout))


class Future:
    """The result of work done by another greenthread, delivered once."""

    def __init__(self) -> None:
        self._ev = eventlet.event.Event()

    def set_result(self, value: Any) -> None:
        if not self._ev.ready():
            self._ev.send(value)

    def set_exception(self, exc: BaseException) -> None:
        if not self._ev.ready():
            self._ev.send_exception(exc)

    def done(self) -> bool:
        return bool(self._ev.ready())

    def result(self, timeout: float | None = None) -> Any:
        """Wait for the result; raise the work's exception, or TimeoutError."""
        if timeout is not None and not self._ev.ready():
            with eventlet.timeout.Timeout(timeout, False):
                return self._ev.wait()
            raise TimeoutError(f"no result within {timeout} s")
        return self._ev.wait()


def set_switch_tracer(tracer: Callable[[str, Any], None] | None) -> Any:
    """Install a greenlet switch tracer (used by the hub-lag monitor)."""
    return greenlet.settrace(tracer)


def monotonic() -> float:
    """Monotonic clock that is never patched."""
    return float(_native_time.monotonic())


def recv_by(sock: Any, size: int, deadline: float) -> bytes:
    """Up to ``size`` bytes from the green ``sock`` by ``deadline``, else TimeoutError.

    The hub waits for the socket: a green socket's timeout is only its own
    attribute, no system call.
    """
    sock.settimeout(_left(deadline))
    data: bytes = sock.recv(size)
    return data


def send_by(sock: Any, data: bytes, deadline: float) -> None:
    """All of ``data`` to the green ``sock`` by ``deadline``, else TimeoutError."""
    sock.settimeout(_left(deadline))
    sock.sendall(data)


def peek(sock: Any, size: int) -> bytes:
    """Up to ``size`` bytes the peer sent and nobody read yet, left unread; never waits.

    A green socket's recv waits for the hub when nothing is there: this asks
    the socket under it.
    """
    real = getattr(sock, "fd", sock)
    try:
        data: bytes = real.recv(size, _socket.MSG_PEEK | _socket.MSG_DONTWAIT)
    except BlockingIOError:
        return b""
    return data


def _left(deadline: float) -> float:
    left = deadline - monotonic()
    if left <= 0:
        raise TimeoutError("socket not ready before its deadline")
    return left


def native_socket_module() -> Any:
    """The ``socket`` module as it was before patching: blocking calls block the calling thread.

    For servers that run in a native thread and must not touch the hub.
    """
    return _native_socket


def native_select_module() -> Any:
    """The ``select`` module as it was before patching (``poll`` blocks the calling thread)."""
    return _native_select


def native_semaphore(count: int) -> Any:
    """A bounded semaphore between native threads (never switches greenthreads)."""
    return _native_threading.BoundedSemaphore(count)


def native_local() -> Any:
    """Per-native-thread storage (``threading.local`` as it was before patching)."""
    return _native_threading.local()


def native_queue() -> Any:
    """An unbounded FIFO between native threads (``queue.SimpleQueue``, unpatched)."""
    return _native_queue.SimpleQueue()
