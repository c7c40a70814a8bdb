"""The /metrics endpoint: a small HTTP/1.0 server in native threads.

A scrape at thousands of instances builds tens of thousands of lines;
built on the hub, that would stall every greenthread for its whole
length. Here the listening socket is a native one: one native thread
accepts connections, reads their requests and sends what a reply's
reader has not taken yet (non-blocking, each under a deadline), and a
fixed pool of native threads renders the scrapes queued to it, so the
hub only loses the GIL for a switch interval at a time. Nothing here
touches eventlet, logs, or calls libvirt or the database.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator
from typing import Any, Protocol

from prometheus_client import Metric, ProcessCollector
from prometheus_client.exposition import generate_latest

from compute_agent import green
from compute_agent.exception import MetricsBindError

_socket = green.native_socket_module()
_select = green.native_select_module()

# Every name is a classic one, so the text is the 0.0.4 format every
# Prometheus reads (newer prometheus_client versions announce 1.0.0).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MAX_REQUEST_BYTES = 8192
# All the time a client has to send its request, however it trickles.
READ_TIMEOUT_S = 5.0
# All the time a scrape has to take its reply (a scraper that stops reading).
WRITE_TIMEOUT_S = 10.0
# Connections whose request is still coming; a new one drops the oldest.
MAX_PENDING = 64
# Replies whose reader is slow, sent by the accept thread; a new one drops the oldest.
MAX_SENDING = 64
# Threads that render and send scrapes (a fixed pool: a flood never adds threads).
MAX_CLIENTS = 4
# Whole requests waiting for one of them, served in turn; one more gets 503.
MAX_QUEUED = 64
ACCEPT_POLL_S = 0.5


class Source(Protocol):
    """What the server needs of the agent's collector."""

    def collect(self) -> Iterator[Metric]: ...

    def instance_text(self) -> str: ...


class _Registry:
    """What ``generate_latest`` reads: the agent's collector, then the process's figures."""

    def __init__(self, collector: Source) -> None:
        self._collectors: list[Source | ProcessCollector] = [
            collector,
            ProcessCollector(registry=None),
        ]

    def collect(self) -> Iterator[Metric]:
        for collector in self._collectors:
            yield from collector.collect()


class MetricsServer:
    """A component of the node service: bound by :meth:`listen`, served from :meth:`start`."""

    def __init__(self, address: str, port: int, collector: Source) -> None:
        self.address = address
        self.port = port
        self._registry = _Registry(collector)
        self._instance_text = collector.instance_text
        self._render_lock = green.native_lock()
        self._queue = green.native_queue()
        self._workers: list[Any] = []
        # The last body and when its render began: scrapes that arrived
        # before that share it instead of rendering again (see _body).
        self._last: tuple[float, bytes] | None = None
        self._sock: Any = None
        # Replies a scrape thread could not send at once, for the accept
        # thread to finish; the socket pair wakes its poll when one comes.
        self._outbox: collections.deque[_Sending] = collections.deque()
        self._wake_r: Any = None
        self._wake_w: Any = None
        self._stopping = False
        self._thread: Any = None
        self.scrapes = 0
        self.errors = 0
        self._counts_guard = green.native_lock()  # the scrape workers count together
        self.last_error: str | None = None

    @property
    def bound_port(self) -> int | None:
        return None if self._sock is None else self._sock.getsockname()[1]

    def listen(self) -> None:
        """Bind now, so a taken port stops the agent before it starts anything."""
        try:
            family, kind, proto, _, addr = _socket.getaddrinfo(
                self.address, self.port, type=_socket.SOCK_STREAM, flags=_socket.AI_PASSIVE
            )[0]
            sock = _socket.socket(family, kind, proto)
        except OSError as exc:
            raise MetricsBindError(
                f"[metrics] cannot listen on {self.address}:{self.port}: {exc.strerror or exc}"
            ) from None
        try:
            sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_REUSEADDR, 1)
            sock.bind(addr)
            sock.listen(16)
            sock.settimeout(ACCEPT_POLL_S)
        except OSError as exc:
            sock.close()
            raise MetricsBindError(
                f"[metrics] cannot listen on {self.address}:{self.port}: {exc.strerror or exc}"
                " (listen_port = 0 turns the endpoint off)"
            ) from None
        self._sock = sock

    def start(self, service: Any = None) -> None:
        if self._sock is None:
            self.listen()
        self._wake_r, self._wake_w = _socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._workers = [
            green.native_thread(self._work, name=f"metrics-scrape-{n}") for n in range(MAX_CLIENTS)
        ]
        self._thread = green.native_thread(self._accept_loop, name="metrics-accept")

    def stop(self) -> None:
        self._stopping = True
        thread, self._thread = self._thread, None
        if self._sock is not None:
            try:
                self._sock.shutdown(_socket.SHUT_RDWR)  # wakes a blocked accept (Linux)
            except OSError:
                pass
        if thread is not None:
            thread.join(ACCEPT_POLL_S * 4)
        for _ in self._workers:
            self._queue.put(None)
        for worker in self._workers:
            worker.join(ACCEPT_POLL_S)
        self._workers = []
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        for end in (self._wake_r, self._wake_w):
            if end is not None:
                end.close()  # a late hand-over's send then fails, and it closes its reply

    # -- serving (native threads) -----------------------------------------

    def render(self) -> bytes:
        """The Prometheus text of every family; one render at a time."""
        with self._render_lock:
            return self._render()

    def _render(self) -> bytes:
        head = generate_latest(self._registry)
        return head + self._instance_text().encode("utf-8")

    def _body(self, arrived: float) -> bytes:
        """A body rendered after ``arrived``: the last one if it began after, else a new one.

        Renders run one at a time; under a flood, the scrapes that queued
        during one render share the next instead of each rendering in
        turn. None sees a state older than its own arrival.
        """
        with self._render_lock:
            last = self._last
            if last is not None and last[0] >= arrived:
                return last[1]
            began = green.monotonic()
            body = self._render()
            self._last = (began, body)
            return body

    def _accept_loop(self) -> None:
        """Accept and read requests here, so only whole requests take a scrape slot.

        A client that connects and sends nothing, or one byte a second,
        would otherwise hold a slot (a thread) while it dawdles: four of
        them and every scrape got 503. Here each connection has
        READ_TIMEOUT_S in all to send its request, and at most MAX_PENDING
        wait at once (the oldest is dropped for a new one).

        The rest of a reply its scraper was slow to take is sent from here
        too, as the socket takes it: four scrapers that never read held the
        four scrape threads for WRITE_TIMEOUT_S each, and every other scrape
        waited behind them. Each has WRITE_TIMEOUT_S in all, and at most
        MAX_SENDING are sent at once (the oldest is dropped for a new one).
        """
        listener = self._sock
        listener.setblocking(False)
        poller = _select.poll()
        poller.register(listener.fileno(), _select.POLLIN)
        poller.register(self._wake_r.fileno(), _select.POLLIN)
        pending: dict[int, _Timed] = {}  # requests still coming, by fd, oldest first
        sending: dict[int, _Timed] = {}  # replies still going, by fd, oldest first
        try:
            while not self._stopping:
                now = green.monotonic()
                wait = ACCEPT_POLL_S
                for table in (pending, sending):
                    first = next(iter(table.values()), None)
                    if first is not None:
                        wait = min(wait, max(0.0, first.deadline - now))
                try:
                    ready = poller.poll(wait * 1000)
                except InterruptedError:
                    continue
                for fd, _ in ready:
                    if fd == listener.fileno():
                        self._accept(listener, poller, pending)
                    elif fd == self._wake_r.fileno():
                        self._take_outbox(poller, sending)
                    elif isinstance(waiting := pending.get(fd), _Pending):
                        self._read(waiting, poller, pending)
                    elif isinstance(reply := sending.get(fd), _Sending):
                        self._send_more(reply, poller, sending)
                now = green.monotonic()
                for table in (pending, sending):
                    for fd in [fd for fd, p in table.items() if p.deadline <= now]:
                        self._drop(table.pop(fd), poller)
        finally:
            for waiting in (*pending.values(), *sending.values()):
                waiting.conn.close()
            while self._outbox:
                self._outbox.popleft().conn.close()

    def _accept(self, listener: Any, poller: Any, pending: dict[int, _Timed]) -> None:
        try:
            conn, _ = listener.accept()
        except OSError:
            if not self._stopping:
                green.native_sleep(0.05)  # out of fds, say: do not spin
            return
        conn.setblocking(False)
        if len(pending) >= MAX_PENDING:
            self._drop(pending.pop(next(iter(pending))), poller)
        pending[conn.fileno()] = _Pending(conn, green.monotonic() + READ_TIMEOUT_S)
        poller.register(conn.fileno(), _select.POLLIN)

    def _drop(self, waiting: _Timed, poller: Any) -> None:
        poller.unregister(waiting.conn.fileno())
        waiting.conn.close()

    def _take_outbox(self, poller: Any, sending: dict[int, _Timed]) -> None:
        try:
            while self._wake_r.recv(512):
                pass
        except BlockingIOError:
            pass
        while self._outbox:
            reply = self._outbox.popleft()
            if len(sending) >= MAX_SENDING:
                self._drop(sending.pop(next(iter(sending))), poller)
            sending[reply.conn.fileno()] = reply
            poller.register(reply.conn.fileno(), _select.POLLOUT)

    def _send_more(self, reply: _Sending, poller: Any, sending: dict[int, _Timed]) -> None:
        if _send_some(reply):
            del sending[reply.conn.fileno()]
            self._drop(reply, poller)

    def _hand_over(self, reply: _Sending) -> None:
        """From a scrape thread: the accept thread sends the rest of this reply."""
        self._outbox.append(reply)
        try:
            self._wake_w.send(b"!")
        except BlockingIOError:
            pass  # the pair is full: the accept thread is already due to look
        except OSError:
            reply.conn.close()  # stopped meanwhile: nobody will send it

    def _read(self, waiting: _Pending, poller: Any, pending: dict[int, _Timed]) -> None:
        conn = waiting.conn
        try:
            chunk = conn.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        waiting.data += chunk
        if chunk and not _complete(waiting.data) and len(waiting.data) <= MAX_REQUEST_BYTES:
            return
        del pending[conn.fileno()]
        poller.unregister(conn.fileno())
        if not waiting.data:
            conn.close()
            return
        self._dispatch(conn, bytes(waiting.data), green.monotonic())

    def _dispatch(self, conn: Any, data: bytes, arrived: float) -> None:
        """Answer a whole request: small replies here, a scrape in a thread of its own."""
        request = _parse_request(conn, data)
        if request is not None:
            method, path = request
            if method not in ("GET", "HEAD"):
                _reply(conn, 405, b"only GET and HEAD\n", extra=[("Allow", "GET, HEAD")])
            elif path == "/metrics":
                if self._queue.qsize() < MAX_QUEUED:
                    self._queue.put((conn, method == "HEAD", arrived))
                    return
                _reply(conn, 503, b"too many scrapes at once\n")
            elif path == "/":
                _reply(conn, 200, b"compute-agent: metrics at /metrics\n", head=method == "HEAD")
            else:
                _reply(conn, 404, b"not found; metrics are at /metrics\n")
        conn.close()

    def _work(self) -> None:
        """A scrape thread: render queued scrapes, in the order they came, until stopped.

        A flood fills the queue, not the process with threads; a
        legitimate scrape waits its turn there instead of losing every
        race for a free thread to the flood's retries (it got 503 at
        each of 59 tries at 16 flooding clients). The thread sends what
        the socket takes at once and hands the rest to the accept thread,
        so a scraper that stops reading never holds it.
        """
        while True:
            item = self._queue.get()
            if item is None or self._stopping:
                if item is not None:
                    item[0].close()
                return
            conn, head, arrived = item
            reply = _Sending(conn, self._scrape(head, arrived), WRITE_TIMEOUT_S)
            if _send_some(reply) or self._stopping:
                conn.close()
            else:
                self._hand_over(reply)

    def _scrape(self, head: bool, arrived: float) -> bytes:
        """The whole reply to a scrape: the body, or a 500 saying why there is none."""
        try:
            body = self._body(arrived)
        except Exception as exc:  # noqa: BLE001 - reported to the scraper, never ends the server
            with self._counts_guard:
                self.errors += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
            return _response(500, f"cannot render metrics: {self.last_error}\n".encode())
        with self._counts_guard:
            self.scrapes += 1
        return _response(200, body, content_type=CONTENT_TYPE, head=head)


class _Timed:
    """A connection the accept thread watches, and when it is dropped."""

    __slots__ = ("conn", "deadline")

    def __init__(self, conn: Any, deadline: float) -> None:
        self.conn = conn
        self.deadline = deadline


class _Pending(_Timed):
    """A connection whose request is still coming."""

    __slots__ = ("data",)

    def __init__(self, conn: Any, deadline: float) -> None:
        super().__init__(conn, deadline)
        self.data = bytearray()


class _Sending(_Timed):
    """A reply on its way, and what is left of it.

    Invariant: ``sent`` never exceeds ``len(data)``; the socket is non-blocking.
    """

    __slots__ = ("data", "sent")

    def __init__(self, conn: Any, data: bytes, within: float) -> None:
        conn.setblocking(False)
        super().__init__(conn, green.monotonic() + within)
        self.data = memoryview(data)
        self.sent = 0


def _send_some(reply: _Sending) -> bool:
    """Send what the socket takes now; True once the reply is done with (all sent, or failed)."""
    try:
        while reply.sent < len(reply.data):
            reply.sent += reply.conn.send(reply.data[reply.sent :])
    except BlockingIOError:
        return False
    except OSError:
        return True  # the scraper went away: nothing more to send
    return True


_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


def _complete(data: bytes | bytearray) -> bool:
    return b"\n\r\n" in data or b"\n\n" in data


def _parse_request(conn: Any, data: bytes) -> tuple[str, str] | None:
    """(method, path) of the request, or None after answering a bad one."""
    if len(data) > MAX_REQUEST_BYTES:
        _reply(conn, 431, b"request too large\n")
        return None
    parts = data.split(b"\n", 1)[0].strip().split()
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
        _reply(conn, 400, b"not an HTTP request\n")
        return None
    method = parts[0].decode("ascii", "replace")
    path = parts[1].split(b"?", 1)[0].decode("ascii", "replace")
    return method, path


def _response(
    status: int,
    body: bytes,
    *,
    content_type: str = "text/plain; charset=utf-8",
    head: bool = False,
    extra: list[tuple[str, str]] | None = None,
) -> bytes:
    headers = [
        f"HTTP/1.0 {status} {_REASONS.get(status, 'Error')}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Connection: close",
        *(f"{k}: {v}" for k, v in extra or []),
    ]
    return ("\r\n".join(headers) + "\r\n\r\n").encode("ascii") + (b"" if head else body)


def _reply(conn: Any, status: int, body: bytes, **kwargs: Any) -> None:
    """A short reply from the accept thread: what the socket takes at once (a few hundred bytes)."""
    try:
        conn.sendall(_response(status, body, **kwargs))
    except OSError:
        pass
