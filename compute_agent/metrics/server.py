"""The /metrics endpoint: a small HTTP/1.0 server in native threads.

A scrape at thousands of instances builds tens of thousands of lines;
built on the hub, that would stall every greenthread for its whole
length. Here the listening socket is a native one, accepted in a native
thread, and each scrape is rendered in a native thread of its own: the
hub only loses the GIL for a switch interval at a time. Nothing here
touches eventlet, logs, or calls libvirt or the database.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import ProcessCollector
from prometheus_client.exposition import generate_latest

from compute_agent import green

_socket = green.native_socket_module()

# Every name is a classic one, so the text is the 0.0.4 format every
# Prometheus reads (newer prometheus_client versions announce 1.0.0).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MAX_REQUEST_BYTES = 8192
READ_TIMEOUT_S = 5.0
# Scrapes served at once; more get 503 at once instead of piling up threads.
MAX_CLIENTS = 4
ACCEPT_POLL_S = 0.5


class MetricsBindError(Exception):
    """The endpoint's address cannot be listened on; the message is one line."""


class _Registry:
    """What ``generate_latest`` reads: the agent's collector, then the process's figures."""

    def __init__(self, collector: Any) -> None:
        self._collectors = [collector, ProcessCollector(registry=None)]

    def collect(self) -> Any:
        for collector in self._collectors:
            yield from collector.collect()


class MetricsServer:
    """A component of the node service: bound by :meth:`listen`, served from :meth:`start`."""

    def __init__(self, address: str, port: int, collector: Any) -> None:
        self.address = address
        self.port = port
        self._registry = _Registry(collector)
        self._instance_text = collector.instance_text
        self._render_lock = green.native_lock()
        self._clients = green.native_semaphore(MAX_CLIENTS)
        self._sock: Any = None
        self._stopping = False
        self._thread: Any = None
        self.scrapes = 0
        self.errors = 0
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
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    # -- serving (native threads) -----------------------------------------

    def render(self) -> bytes:
        """The Prometheus text of every family; one render at a time."""
        with self._render_lock:
            head = generate_latest(self._registry)  # type: ignore[arg-type]
            return head + self._instance_text().encode("utf-8")

    def _accept_loop(self) -> None:
        sock = self._sock
        while not self._stopping:
            try:
                conn, _ = sock.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stopping:
                    return
                green.native_sleep(ACCEPT_POLL_S)
                continue
            if not self._clients.acquire(blocking=False):
                _reply(conn, 503, b"too many scrapes at once\n")
                conn.close()
                continue
            try:
                green.native_thread(self._serve, conn, name="metrics-scrape")
            except RuntimeError:
                self._clients.release()
                conn.close()

    def _serve(self, conn: Any) -> None:
        try:
            conn.settimeout(READ_TIMEOUT_S)
            request = _read_request(conn)
            if request is None:
                return
            method, path = request
            if method not in ("GET", "HEAD"):
                _reply(conn, 405, b"only GET and HEAD\n", extra=[("Allow", "GET, HEAD")])
            elif path == "/metrics":
                self._scrape(conn, head=method == "HEAD")
            elif path == "/":
                _reply(conn, 200, b"compute-agent: metrics at /metrics\n", head=method == "HEAD")
            else:
                _reply(conn, 404, b"not found; metrics are at /metrics\n")
        except OSError:
            pass  # the scraper went away or never spoke
        finally:
            conn.close()
            self._clients.release()

    def _scrape(self, conn: Any, head: bool) -> None:
        try:
            body = self.render()
        except Exception as exc:  # noqa: BLE001 - reported to the scraper, never ends the server
            self.errors += 1
            self.last_error = f"{type(exc).__name__}: {exc}"
            _reply(conn, 500, f"cannot render metrics: {self.last_error}\n".encode())
            return
        self.scrapes += 1
        _reply(conn, 200, body, content_type=CONTENT_TYPE, head=head)


_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


def _read_request(conn: Any) -> tuple[str, str] | None:
    """(method, path) of the request, or None after answering a bad one."""
    data = b""
    while b"\n\r\n" not in data and b"\n\n" not in data:
        chunk = conn.recv(4096)
        if not chunk:
            if not data:
                return None
            break
        data += chunk
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


def _reply(
    conn: Any,
    status: int,
    body: bytes,
    *,
    content_type: str = "text/plain; charset=utf-8",
    head: bool = False,
    extra: list[tuple[str, str]] | None = None,
) -> None:
    headers = [
        f"HTTP/1.0 {status} {_REASONS.get(status, 'Error')}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Connection: close",
        *(f"{k}: {v}" for k, v in extra or []),
    ]
    try:
        conn.sendall(("\r\n".join(headers) + "\r\n\r\n").encode("ascii") + (b"" if head else body))
    except OSError:
        pass
