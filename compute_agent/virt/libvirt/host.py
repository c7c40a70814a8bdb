"""The libvirt connections: opened off the hub, watched, and reopened when lost.

libvirt is a C library whose calls block. Every call therefore runs in a
native thread, through :meth:`Host.run`, which runs a whole function of
several raw calls in one trip, on a connection that carries no other call
(``pool.py`` says why).

libvirt's own event loop runs in a native thread. Its callbacks (connection
closed, domain lifecycle) only put an item on a :class:`green.NativeQueue`,
whose self-pipe wakes the hub; one greenthread takes them off and acts.
"""

from __future__ import annotations

import logging
import urllib.parse
from collections.abc import Callable
from typing import Any, TypeVar

import libvirt

from compute_agent import exception, green
from compute_agent.metrics import registry
from compute_agent.virt.libvirt.pool import Connection, ConnectionPool

LOG = logging.getLogger(__name__)
T = TypeVar("T")

# The open's deadline when keepalive is off (keepalive_interval = 0).
OPEN_TIMEOUT_S = 20.0

# (domain name, domain UUID, libvirt event, libvirt detail), called on the hub.
OnLifecycle = Callable[[str, str, int, int], None]

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


def has_private_state(uri: str) -> bool:
    """True for libvirt's test driver on a node file: each connection to it
    holds its own copy of the host (``test:///default`` is shared)."""
    parsed = urllib.parse.urlsplit(uri)
    return parsed.scheme.split("+")[0] == "test" and parsed.path not in ("", "/default")


class Host:
    """The libvirt connections, their events, and reconnection when they are lost.

    Calls go through a :class:`ConnectionPool`, one call per connection.
    Events (the close callback, domain lifecycle) are registered on a
    connection of their own that carries no call after its registration, so
    a call stuck in libvirt never holds up the events. On a node file of the
    test driver (:func:`has_private_state`) one connection carries events and
    calls, since a second one would see another copy of the host.

    Each connection belongs to a generation; a loss starts a new one, and
    callbacks, failures and connections of an older generation are ignored
    or closed once their call returns.
    """

    def __init__(
        self,
        uri: str,
        on_connection: Callable[[bool, str], None],
        on_lifecycle: OnLifecycle,
        *,
        reconnect_min: float = 1.0,
        reconnect_max: float = 30.0,
        keepalive: tuple[int, int] = (5, 3),
        pool_size: int = 4,
        stuck_after: float = 10.0,
        max_stuck: int = 8,
    ) -> None:
        self.uri = uri
        self._on_connection = on_connection
        # Told of each lifecycle event, on the dispatcher, once start() asked for events.
        self.on_lifecycle = on_lifecycle
        self.wants_events = False
        self._reconnect_min = reconnect_min
        self._reconnect_max = max(reconnect_min, reconnect_max)
        self._keepalive = keepalive
        interval, count = keepalive
        # What keepalive allows a silent daemon once connected, for the open too.
        self.open_timeout = float(interval * (count + 1)) if interval > 0 else OPEN_TIMEOUT_S
        self._opening: green.Task | None = None  # an open that outlived its wait
        self._opening_since = 0.0
        self.shared_state = not has_private_state(uri)
        self.pool = ConnectionPool(
            self._open_raw if self.shared_state else None,
            self._close_connection,
            size=pool_size,
            stuck_after=stuck_after,
            max_stuck=max_stuck,
        )
        # The connection the events are registered on (in the pool too when
        # the state is private); None while disconnected.
        self._events_connection: Connection | None = None
        self._generation = 0
        self._events = green.NativeQueue()
        self._dispatcher: green.Task | None = None
        self._reconnector: green.Task | None = None
        self._reconnecting = False  # a reconnection is due or under way
        # The generation, the events connection and _reconnecting change together,
        # from the hub, a failing call's task or the events' dispatcher (several
        # threads under the threads backend): held briefly, never across a switch.
        self._guard = green.native_lock()
        self._stopping = False
        self.last_error: str | None = None

    # -- life cycle -------------------------------------------------------

    def start(self, *, events: bool) -> None:
        """Open the connection; if that fails, keep retrying in the background.

        ``events``: register for lifecycle events (at each connection), handed
        to ``on_lifecycle``.
        """
        self.wants_events = events
        _EventLoop.ensure_started()
        self._dispatcher = green.spawn(self._dispatch, name="libvirt-dispatch")
        try:
            self._connect()
        except exception.HypervisorUnavailable as exc:
            self._lost(str(exc), self._generation)
            raise

    def stop(self) -> None:
        """Close what is idle; a connection still carrying a call is closed by
        its own thread when the call returns."""
        self._stopping = True
        for gt in (self._reconnector, self._dispatcher):
            if gt is not None:
                gt.cancel()
        self._discard()
        self._events.close()
        if running := self.pool.in_flight:
            LOG.warning(
                "%d libvirt call(s) still running at stop; each connection is closed "
                "when its call returns, never under it",
                running,
            )

    @property
    def connected(self) -> bool:
        return self._events_connection is not None

    def _require(self) -> int:
        """The generation of the live connection; HypervisorUnavailable without one."""
        if self._events_connection is None:
            raise exception.HypervisorUnavailable(
                f"libvirt at {self.uri} is not connected: {self.last_error or 'not started'}"
            )
        return self._generation

    @property
    def conn(self) -> Any:
        """The events connection behind a thread-pool proxy, for tests' and
        benchmarks' out-of-band calls. The agent's own calls go through :meth:`run`."""
        self._require()
        assert self._events_connection is not None
        return green.proxy(
            self._events_connection.raw, autowrap=(libvirt.virConnect, libvirt.virDomain)
        )

    @property
    def inflight(self) -> int:
        """Calls running now (set-aside ones included); safe from any thread."""
        return self.pool.in_flight

    def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(raw_connection, *args)`` in a native thread, in one trip,
        on a connection that carries no other call meanwhile.

        A connection failure marks the connection lost (starting the
        reconnection) and is raised as HypervisorUnavailable.
        """
        generation = self._require()
        started = green.monotonic()
        try:
            return self.pool.run(generation, fn, *args)
        except libvirt.libvirtError as exc:
            if is_connection_error(exc):
                self._lost(f"{exc.get_error_message()}", generation)
                raise exception.HypervisorUnavailable(
                    f"libvirt at {self.uri} failed: {exc.get_error_message()}"
                ) from exc
            raise
        finally:
            registry.LIBVIRT_CALL_DURATION.observe(
                (registry.libvirt_call_name(fn),), green.monotonic() - started
            )

    # -- connecting -------------------------------------------------------

    def _connect(self) -> None:
        try:
            raw = self._open_within_deadline()
        except libvirt.libvirtError as exc:
            raise exception.HypervisorUnavailable(
                f"cannot connect to libvirt at {self.uri}: {exc.get_error_message()}"
            ) from None
        with self._guard:
            self._generation += 1
            generation = self._generation
            stale = self.pool.reset(generation)
        lifecycle_id = green.execute(self._register_native, raw, generation)
        self._close_all(stale)
        with self._guard:
            if generation == self._generation:
                if self.shared_state:
                    self._events_connection = Connection(raw, generation, lifecycle_id)
                else:
                    self._events_connection = self.pool.adopt(raw, lifecycle_id)
                raw = None
        if raw is not None:  # lost (or stopped) while registering: not ours any more
            self._close_all([Connection(raw, generation, lifecycle_id)])
            raise exception.HypervisorUnavailable(f"libvirt at {self.uri} lost while connecting")
        self.last_error = None
        LOG.info("connected to libvirt at %s", self.uri)

    def _open_within_deadline(self) -> Any:
        """Open the events connection, waiting at most ``open_timeout`` s.

        libvirt's open has no deadline (keepalive starts after it): on a hung
        libvirtd it waited for ever, inside the agent's start, and a SIGTERM
        waited with it until systemd killed the agent. Past the deadline the
        open is left to finish in its own task, which closes what it opens
        then; no second open starts while it is out.
        """
        with self._guard:
            pending, since = self._opening, self._opening_since
        if pending is not None and not pending.done():
            raise exception.HypervisorUnavailable(
                f"libvirt at {self.uri} has not answered an open for "
                f"{green.monotonic() - since:.0f} s"
            )
        started = green.monotonic()
        opening = green.submit(green.execute, self._open_raw, name="libvirt-open")
        try:
            return opening.result(self.open_timeout)
        except TimeoutError:
            with self._guard:
                self._opening, self._opening_since = opening, started
            opening.add_done_callback(self._close_late_open)
            raise exception.HypervisorUnavailable(
                f"libvirt at {self.uri} did not answer an open within {self.open_timeout:.0f} s"
            ) from None
        except libvirt.libvirtError:
            raise
        except BaseException:  # this task cancelled while it waited: the open is not ours
            opening.add_done_callback(self._close_late_open)
            raise

    def _close_late_open(self, opening: green.Task) -> None:
        try:
            raw = opening.result(0)
        except BaseException:  # noqa: BLE001 - failed or cancelled: nothing to close
            return
        LOG.info("libvirt at %s answered a late open; closing that connection", self.uri)
        green.spawn(self._close_all, [Connection(raw, 0, None)], name="libvirt-late-open")

    def _open_raw(self) -> Any:
        raw = libvirt.open(self.uri)
        interval, count = self._keepalive
        if interval > 0:
            try:
                raw.setKeepAlive(interval, count)
            except libvirt.libvirtError:
                pass  # local drivers have no keepalive
        return raw

    def _register_native(self, raw: Any, generation: int) -> int | None:
        """The close callback and, with a handler, lifecycle events; the latter's id."""
        try:
            raw.registerCloseCallback(self._closed_native, generation)
        except libvirt.libvirtError as exc:
            LOG.debug("close callback not supported by %s: %s", self.uri, exc)
        if not self.wants_events:
            return None
        try:
            lifecycle_id: int = raw.domainEventRegisterAny(
                None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._lifecycle_native, generation
            )
        except libvirt.libvirtError as exc:
            LOG.error("lifecycle events unavailable from %s: %s", self.uri, exc)
            return None
        return lifecycle_id

    @staticmethod
    def _close_connection(connection: Connection) -> None:
        """In a native thread, with no call in the connection: deregister, close."""
        raw = connection.raw
        try:
            if connection.lifecycle_id is not None:
                raw.domainEventDeregisterAny(connection.lifecycle_id)
            raw.unregisterCloseCallback()
        except libvirt.libvirtError:
            pass
        try:
            raw.close()
        except libvirt.libvirtError as exc:
            LOG.debug("closing a libvirt connection: %s", exc)

    def _close_all(self, connections: list[Connection]) -> None:
        for connection in connections:
            green.execute(self._close_connection, connection)

    def _end_generation_locked(self) -> list[Connection]:
        """Start a new generation (under ``_guard``); the idle connections to close."""
        self._generation += 1
        idle = self.pool.reset(self._generation)
        events, self._events_connection = self._events_connection, None
        if events is not None and events not in idle and self.shared_state:
            idle.append(events)  # in the pool when private, closed with it
        return idle

    def _discard(self) -> None:
        """End the current generation: close what carries no call, now."""
        with self._guard:
            idle = self._end_generation_locked()
        if idle:
            green.spawn(self._close_all, idle, name="libvirt-discard")

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
        """The connections of ``generation`` are gone; reconnect unless already doing so."""
        with self._guard:  # one decision: a failing call and the close callback may race
            if self._stopping or generation != self._generation:
                return
            was_connected = self._events_connection is not None
            idle = self._end_generation_locked()
            self.last_error = reason
            reconnect, self._reconnecting = not self._reconnecting, True
        if idle:
            green.spawn(self._close_all, idle, name="libvirt-discard")
        if was_connected:
            LOG.error("lost the libvirt connection to %s: %s", self.uri, reason)
        self._on_connection(False, reason)
        if reconnect:
            self._reconnector = green.spawn(self._reconnect_loop, name="libvirt-reconnect")

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
            with self._guard:
                done = self._events_connection is not None  # else lost again meanwhile
                if done:
                    self._reconnecting = False
                    self._reconnector = None
            if not done:
                continue
            LOG.info("libvirt connection restored after %d attempt(s)", attempts)
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
                elif kind == "lifecycle" and generation == self._generation:
                    self.on_lifecycle(*payload)
            except Exception:
                LOG.exception("error handling libvirt %s event", kind)

    @property
    def generation(self) -> int:
        return self._generation
