"""The libvirt connection: opened off the hub, watched, and reopened when lost.

libvirt is a C library whose calls block. Every call therefore runs in the
native thread pool: either through ``conn`` (a tpool proxy that wraps
returned domains too) or through :meth:`Host.run`, which runs a whole
function of several raw calls in one trip to the pool.

libvirt's own event loop runs in a native thread. Its callbacks (connection
closed, domain lifecycle) only put an item on a :class:`green.NativeQueue`,
whose self-pipe wakes the hub; one greenthread takes them off and acts.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

import libvirt

from compute_agent import exception, green
from compute_agent.metrics import figures

LOG = logging.getLogger(__name__)
T = TypeVar("T")

# (domain name, domain UUID, libvirt event, libvirt detail), called on the hub.
LifecycleHandler = Callable[[str, str, int, int], None]

# libvirt prints every error to stderr unless given a handler; errors reach
# us as exceptions, so the printing is only noise.
libvirt.registerErrorHandler(lambda _ctx, _err: None, None)

_CONNECTION_CODES = {
    libvirt.VIR_ERR_NO_CONNECT,
    libvirt.VIR_ERR_INVALID_CONN,
    libvirt.VIR_ERR_RPC,
}
_TRANSPORT_CODES = {libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_ERR_INTERNAL_ERROR}
_TRANSPORT_DOMAINS = {libvirt.VIR_FROM_REMOTE, libvirt.VIR_FROM_RPC}

_CLOSE_REASONS = {
    libvirt.VIR_CONNECT_CLOSE_REASON_ERROR: "connection error",
    libvirt.VIR_CONNECT_CLOSE_REASON_EOF: "daemon closed the connection",
    libvirt.VIR_CONNECT_CLOSE_REASON_KEEPALIVE: "keepalive timeout",
    libvirt.VIR_CONNECT_CLOSE_REASON_CLIENT: "closed by client",
}


def is_connection_error(exc: BaseException) -> bool:
    """True when ``exc`` means the connection, not the request, failed."""
    if not isinstance(exc, libvirt.libvirtError):
        return False
    code, domain = exc.get_error_code(), exc.get_error_domain()
    return code in _CONNECTION_CODES or (code in _TRANSPORT_CODES and domain in _TRANSPORT_DOMAINS)


class _EventLoop:
    """libvirt's default event loop in one native thread, once per process."""

    _started = False
    _lock = green.native_lock()

    @classmethod
    def ensure_started(cls) -> None:
        with cls._lock:
            if cls._started:
                return
            libvirt.virEventRegisterDefaultImpl()
            green.native_thread(cls._run, name="libvirt-event-loop")
            cls._started = True

    @staticmethod
    def _run() -> None:
        while True:
            libvirt.virEventRunDefaultImpl()


class _Connection:
    """One opened connection, and how many calls are running on it.

    libvirt must not close a connection while another thread is inside a
    call on it (a use-after-free: the process crashes), so an old
    connection is closed only once its calls have drained.
    """

    def __init__(self, raw: Any, generation: int, lifecycle_id: int | None) -> None:
        self.raw = raw
        self.lifecycle_id = lifecycle_id
        self.proxy = green.proxy(raw, autowrap=(libvirt.virConnect, libvirt.virDomain))
        self.generation = generation
        self.inflight = 0
        # Counted down by the native thread that made the call, not by the
        # greenthread waiting for it: a waiter killed (a call deadline, a
        # cancelled sync) leaves while its call still runs in the pool.
        self._lock = green.native_lock()

    def enter(self) -> None:
        with self._lock:
            self.inflight += 1

    def leave(self) -> None:
        with self._lock:
            self.inflight -= 1

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run in a pool thread: ``fn(raw, *args)``, counted until it returns."""
        try:
            return fn(self.raw, *args)
        finally:
            self.leave()

    def wait_idle(self, timeout: float) -> bool:
        """Wait, green, until no call runs on this connection; False on timeout."""
        end = green.monotonic() + timeout
        while self.inflight > 0:
            if green.monotonic() >= end:
                return False
            green.sleep(0.05)
        return True


class Host:
    """One libvirt connection with reconnection and connection listeners."""

    # How long an old connection may wait for its calls before it is closed;
    # a call hung for longer than this leaks the connection rather than crash.
    DRAIN_TIMEOUT_S = 300.0

    def __init__(
        self,
        uri: str,
        on_connection: Callable[[bool, str], None],
        *,
        reconnect_min: float = 1.0,
        reconnect_max: float = 30.0,
        keepalive: tuple[int, int] = (5, 3),
    ) -> None:
        self.uri = uri
        self._on_connection = on_connection
        self._reconnect_min = reconnect_min
        self._reconnect_max = max(reconnect_min, reconnect_max)
        self._keepalive = keepalive
        self._current: _Connection | None = None
        self._generation = 0
        self._events = green.NativeQueue()
        self._dispatcher: green.Task | None = None
        self._reconnector: green.Task | None = None
        self._stopping = False
        self.last_error: str | None = None
        # Set before start() to receive domain lifecycle events.
        self.lifecycle_handler: LifecycleHandler | None = None

    # -- life cycle -------------------------------------------------------

    def start(self) -> None:
        """Open the connection; if that fails, keep retrying in the background."""
        _EventLoop.ensure_started()
        self._dispatcher = green.spawn(self._dispatch, name="libvirt-dispatch")
        try:
            self._connect()
        except exception.HypervisorUnavailable as exc:
            self._lost(str(exc), self._generation)
            raise

    def stop(self, drain: float = 5.0) -> None:
        self._stopping = True
        for gt in (self._reconnector, self._dispatcher):
            if gt is not None:
                gt.cancel()
        current, self._current = self._current, None
        if current is not None:
            self._close_when_idle(current, drain)
        self._events.close()

    @property
    def connected(self) -> bool:
        return self._current is not None

    def _require(self) -> _Connection:
        if self._current is None:
            raise exception.HypervisorUnavailable(
                f"libvirt at {self.uri} is not connected: {self.last_error or 'not started'}"
            )
        return self._current

    @property
    def conn(self) -> Any:
        """The connection behind a tpool proxy (returned domains proxied too).

        For single ad-hoc calls; driver code uses :meth:`run`, whose calls are
        counted so that a lost connection is closed only once they drain.
        """
        return self._require().proxy

    @property
    def inflight(self) -> int:
        """Calls now running through :meth:`run` on the current connection.

        Read once: the metrics scrape calls this from a native thread while
        the hub may drop the connection.
        """
        current = self._current
        return 0 if current is None else current.inflight

    def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(raw_connection, *args)`` in the thread pool, in one trip.

        A connection failure marks the connection lost (starting the
        reconnection) and is raised as HypervisorUnavailable.
        """
        current = self._require()
        current.enter()  # left by the pool thread once the call returns
        started = green.monotonic()
        try:
            result: T = green.execute(current.call, fn, *args)
            return result
        except libvirt.libvirtError as exc:
            if is_connection_error(exc):
                self._lost(f"{exc.get_error_message()}", current.generation)
                raise exception.HypervisorUnavailable(
                    f"libvirt at {self.uri} failed: {exc.get_error_message()}"
                ) from exc
            raise
        finally:
            figures.LIBVIRT_CALL_DURATION.observe(
                (figures.libvirt_call_name(fn),), green.monotonic() - started
            )

    # -- connecting -------------------------------------------------------

    def _connect(self) -> None:
        try:
            raw = green.execute(self._open_raw)
        except libvirt.libvirtError as exc:
            raise exception.HypervisorUnavailable(
                f"cannot connect to libvirt at {self.uri}: {exc.get_error_message()}"
            ) from None
        self._generation += 1
        generation = self._generation
        try:
            green.execute(raw.registerCloseCallback, self._closed_native, generation)
        except libvirt.libvirtError as exc:
            LOG.debug("close callback not supported by %s: %s", self.uri, exc)
        lifecycle_id = None
        if self.lifecycle_handler is not None:
            try:
                lifecycle_id = green.execute(
                    raw.domainEventRegisterAny,
                    None,
                    libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE,
                    self._lifecycle_native,
                    generation,
                )
            except libvirt.libvirtError as exc:
                LOG.error("lifecycle events unavailable from %s: %s", self.uri, exc)
        self._current = _Connection(raw, generation, lifecycle_id)
        self.last_error = None
        LOG.info("connected to libvirt at %s", self.uri)

    def _open_raw(self) -> Any:
        raw = libvirt.open(self.uri)
        interval, count = self._keepalive
        if interval > 0:
            try:
                raw.setKeepAlive(interval, count)
            except libvirt.libvirtError:
                pass  # local drivers have no keepalive
        return raw

    @staticmethod
    def _close_raw(raw: Any, lifecycle_id: int | None) -> None:
        try:
            if lifecycle_id is not None:
                raw.domainEventDeregisterAny(lifecycle_id)
            raw.unregisterCloseCallback()
        except libvirt.libvirtError:
            pass
        raw.close()

    def _closed_native(self, _conn: Any, reason: int, generation: int) -> None:
        # Runs in libvirt's event-loop thread: queue it, touch nothing else.
        self._events.put(("closed", generation, _CLOSE_REASONS.get(reason, f"reason {reason}")))

    def _lifecycle_native(
        self, _conn: Any, dom: Any, event: int, detail: int, generation: int
    ) -> None:
        # Runs in libvirt's event-loop thread. name() and UUIDString() read the
        # domain object the event carries; neither makes a call to the daemon.
        self._events.put(("lifecycle", generation, dom.name(), dom.UUIDString(), event, detail))

    def _lost(self, reason: str, generation: int) -> None:
        """The connection of ``generation`` is gone; reconnect unless already doing so."""
        if self._stopping or generation != self._generation:
            return
        old, self._current = self._current, None
        self._generation += 1  # stale callbacks and failures of the old one are ignored
        self.last_error = reason
        if old is not None:
            LOG.error("lost the libvirt connection to %s: %s", self.uri, reason)
            green.spawn(self._close_when_idle, old, self.DRAIN_TIMEOUT_S, name="libvirt-discard")
        self._on_connection(False, reason)
        if self._reconnector is None:
            self._reconnector = green.spawn(self._reconnect_loop, name="libvirt-reconnect")

    def _close_when_idle(self, connection: _Connection, timeout: float) -> None:
        if not connection.wait_idle(timeout):
            LOG.error(
                "%d libvirt call(s) still running on the old connection after %.0f s; "
                "leaving it open rather than risk closing it under them",
                connection.inflight,
                timeout,
            )
            return
        try:
            green.execute(self._close_raw, connection.raw, connection.lifecycle_id)
        except libvirt.libvirtError as exc:
            LOG.debug("closing libvirt connection: %s", exc)

    def _reconnect_loop(self) -> None:
        delay = self._reconnect_min
        attempts = 0
        while not self._stopping:
            green.sleep(delay)
            attempts += 1
            try:
                self._connect()
            except exception.HypervisorUnavailable as exc:
                self.last_error = str(exc)
                delay = min(delay * 2, self._reconnect_max)
                LOG.warning(
                    "libvirt reconnection attempt %d failed; next in %.1f s: %s",
                    attempts,
                    delay,
                    exc,
                )
                continue
            LOG.info("libvirt connection restored after %d attempt(s)", attempts)
            self._reconnector = None
            self._on_connection(True, f"reconnected after {attempts} attempt(s)")
            return

    # -- the dispatcher ---------------------------------------------------

    def _dispatch(self) -> None:
        while not self._stopping:
            try:
                kind, generation, *payload = self._events.get()
            except green.QueueEmpty:
                return
            try:
                if kind == "closed":
                    self._lost(payload[0], generation)
                elif (
                    kind == "lifecycle"
                    and generation == self._generation
                    and self.lifecycle_handler is not None
                ):
                    self.lifecycle_handler(*payload)
            except Exception:
                LOG.exception("error handling libvirt %s event", kind)

    @property
    def generation(self) -> int:
        return self._generation
