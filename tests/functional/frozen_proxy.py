"""A TCP proxy that can freeze: a database that stops answering, on demand.

Frozen, it keeps every connection open and forwards nothing, and it still
accepts new connections but never answers them: what a client sees when a
server hangs, or a network path drops packets without resetting anything.
Thawed, bytes held meanwhile go on, and new connections are forwarded again.

Threads are green when the process is monkey-patched (the tests) and
native when not (a benchmark); the class works the same either way::

    proxy = FrozenProxy("127.0.0.1", 5432)
    proxy.start()           # proxy.port is the port to use instead of 5432
    proxy.freeze(); proxy.thaw()
    proxy.stop()

With ``delay`` it is also a distant server: each chunk waits that long
before it goes on, each way.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable

_CHUNK = 65536
_POLL = 0.1  # how often a waiting thread looks whether the proxy stops


class FrozenProxy:
    """Forwards 127.0.0.1:``port`` to ``target_host``:``target_port`` until frozen.

    Each socket is closed by the thread that uses it, never under another
    thread's read (eventlet refuses that), so every wait polls ``_POLL``.
    """

    def __init__(
        self, target_host: str, target_port: int, *, frozen: bool = False, delay: float = 0.0
    ) -> None:
        """``delay``: seconds each chunk waits before it is forwarded, each way (a
        distant server: a round trip costs twice that)."""
        self.target = (target_host, target_port)
        self.delay = delay
        self.port = 0
        self.accepted = 0
        self._thawed = threading.Event()
        if not frozen:
            self._thawed.set()
        self._stopping = False
        self._threads: list[threading.Thread] = []

    @property
    def frozen(self) -> bool:
        return not self._thawed.is_set()

    def start(self) -> FrozenProxy:
        """Listen on an ephemeral port of 127.0.0.1 (``self.port``)."""
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen(128)
        listener.settimeout(_POLL)
        self.port = listener.getsockname()[1]
        self._spawn(self._accept_loop, listener)
        return self

    def freeze(self) -> None:
        """Forward nothing more; accept new connections and never answer them."""
        self._thawed.clear()

    def thaw(self) -> None:
        """Forward again, held bytes first."""
        self._thawed.set()

    def stop(self, timeout: float = 5.0) -> None:
        """Close the listener and every connection; wait for the threads to end."""
        self._stopping = True
        self._thawed.set()
        end = time.monotonic() + timeout
        for thread in list(self._threads):
            thread.join(max(0.0, end - time.monotonic()))

    def __enter__(self) -> FrozenProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the work -----------------------------------------------------------

    def _spawn(self, fn: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=fn, args=args, name="frozen-proxy", daemon=True)
        self._threads = [t for t in self._threads if t.is_alive()] + [thread]
        thread.start()

    def _wait_thawed(self) -> bool:
        """Wait for the thaw; False if the proxy stops first."""
        while not self._thawed.wait(_POLL):
            pass
        return not self._stopping

    def _accept_loop(self, listener: socket.socket) -> None:
        with listener:
            while not self._stopping:
                try:
                    client, _ = listener.accept()
                except (TimeoutError, BlockingIOError):
                    continue
                client.settimeout(_POLL)
                self.accepted += 1
                self._spawn(self._serve, client)

    def _serve(self, client: socket.socket) -> None:
        # A connection accepted while frozen waits, unanswered, for the thaw.
        if not self._wait_thawed():
            _close(client)
            return
        try:
            upstream = socket.create_connection(self.target, timeout=5)
        except OSError:
            _close(client)
            return
        upstream.settimeout(_POLL)
        pair = _Pair(client, upstream)
        self._spawn(self._pump, upstream, client, pair)
        self._pump(client, upstream, pair)

    def _pump(self, src: socket.socket, dst: socket.socket, pair: _Pair) -> None:
        """Copy ``src`` to ``dst``; bytes read while frozen wait for the thaw."""
        try:
            while not (self._stopping or pair.ended):
                try:
                    data = src.recv(_CHUNK)
                except TimeoutError:
                    continue
                if not data or not self._wait_thawed():
                    break
                if self.delay:
                    time.sleep(self.delay)
                dst.sendall(data)
        except (OSError, EOFError):
            pass
        finally:
            pair.end()


class _Pair:
    """A client and its upstream: one side ending ends both; the last pump out closes."""

    def __init__(self, *sockets: socket.socket) -> None:
        self.sockets = sockets
        self.ended = False
        self._pumps = 2
        self._lock = threading.Lock()

    def end(self) -> None:
        with self._lock:
            self.ended = True
            self._pumps -= 1
            last = self._pumps == 0
        if last:
            for sock in self.sockets:
                _close(sock)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()
