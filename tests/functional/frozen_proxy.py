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
"""

from __future__ import annotations

import contextlib
import socket
import threading

_CHUNK = 65536


class FrozenProxy:
    """Forwards 127.0.0.1:``port`` to ``target_host``:``target_port`` until frozen."""

    def __init__(self, target_host: str, target_port: int, *, frozen: bool = False) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self._thawed = threading.Event()
        if not frozen:
            self._thawed.set()
        self._stopping = False
        self._listener: socket.socket | None = None
        self._sockets: set[socket.socket] = set()
        self._lock = threading.Lock()
        self.accepted = 0

    @property
    def frozen(self) -> bool:
        return not self._thawed.is_set()

    def start(self) -> FrozenProxy:
        """Listen on an ephemeral port of 127.0.0.1 (``self.port``)."""
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen(128)
        listener.settimeout(0.2)  # so that stop() is noticed
        self._listener = listener
        self.port = listener.getsockname()[1]
        threading.Thread(target=self._accept_loop, name="frozen-proxy-accept", daemon=True).start()
        return self

    def freeze(self) -> None:
        """Forward nothing more; accept new connections and never answer them."""
        self._thawed.clear()

    def thaw(self) -> None:
        """Forward again, held bytes first."""
        self._thawed.set()

    def stop(self) -> None:
        """Close the listener and every connection."""
        self._stopping = True
        self._thawed.set()
        with self._lock:
            sockets = list(self._sockets)
            self._sockets.clear()
        for sock in sockets:
            _close(sock)
        if self._listener is not None:
            _close(self._listener)

    def __enter__(self) -> FrozenProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the work -----------------------------------------------------------

    def _track(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.add(sock)

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopping:
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # closed by stop()
            client.settimeout(None)
            self.accepted += 1
            self._track(client)
            threading.Thread(
                target=self._serve, args=(client,), name="frozen-proxy-conn", daemon=True
            ).start()

    def _serve(self, client: socket.socket) -> None:
        # A connection accepted while frozen waits, unanswered, for the thaw.
        self._thawed.wait()
        if self._stopping:
            return
        try:
            upstream = socket.create_connection(self.target, timeout=5)
        except OSError:
            _close(client)
            return
        upstream.settimeout(None)
        self._track(upstream)
        threading.Thread(
            target=self._pump, args=(upstream, client), name="frozen-proxy-pump", daemon=True
        ).start()
        self._pump(client, upstream)

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        """Copy ``src`` to ``dst``; bytes read while frozen wait for the thaw."""
        try:
            while True:
                data = src.recv(_CHUNK)
                if not data:
                    break
                self._thawed.wait()
                if self._stopping:
                    break
                dst.sendall(data)
        except (OSError, EOFError):  # EOFError: eventlet's recv on a socket closed meanwhile
            pass
        finally:
            # Either side gone ends the pair (the other pump then sees EOF).
            with self._lock:
                self._sockets.difference_update((src, dst))
            _close(src)
            _close(dst)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()
