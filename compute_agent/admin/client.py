"""The CLI's side of the admin socket: one connection per call, plain sockets.

Three kinds of failure, because the CLI gives each its own exit status:
:class:`AgentUnreachable` (no agent answers: no socket file, nobody
listening, no answer in time: :class:`AgentTimeout`), :class:`RemoteError` (the
agent answered with a typed error) and :class:`ClientError` (anything
else: no permission on the socket, the agent hung up mid-call, a reply
that is not of this protocol).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import Any

from compute_agent.admin import protocol
from compute_agent.exception import (
    AgentTimeout,
    AgentUnreachable,
    ClientError,
    ProtocolError,
    RemoteError,
)

CONNECT_TIMEOUT = 5.0
# How long a call waits for the agent's answer unless told otherwise.
DEFAULT_TIMEOUT = 30.0
# A call that reports progress may go on this long in all.
MAX_TOTAL = 6 * 3600.0
READ_SIZE = 65536
# Calls that change nothing: a timed-out one has no effect to warn about.
READ_ONLY = frozenset(
    {
        "ping",
        "status",
        "get_host_state",
        "list_instances",
        "get_instance_info",
        "get_instance_stats",
        "get_instance_actions",
    }
)

ProgressCallback = Callable[[int, int], None]


class AdminClient:
    """One call per connection, within one deadline.

    ``timeout`` bounds the whole call (connect, send, every read), measured
    on one monotonic clock, so a server that trickles bytes cannot stretch
    it. A progress line proves the agent is working: it moves the deadline
    to ``timeout`` s after that line, but never past ``max_total`` s after
    the start.
    """

    def __init__(
        self,
        path: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        connect_timeout: float = CONNECT_TIMEOUT,
        max_total: float = MAX_TOTAL,
    ) -> None:
        self.path = path
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.max_total = max(max_total, timeout)

    def call(
        self,
        method: str,
        args: dict[str, Any] | None = None,
        *,
        on_progress: ProgressCallback | None = None,
    ) -> Any:
        """Make one call and return its result; progress lines go to ``on_progress``."""
        clock = _Deadline(self.timeout, self.max_total)
        sock = self._connect(clock)
        try:
            try:
                _arm(sock, clock.left())
                sock.sendall(protocol.request(method, args))
            except TimeoutError:
                raise self._timed_out(clock, method) from None
            except OSError as exc:
                # A refused connection (TooManyConnections) is closed after
                # its error reply: that reply says more than the broken pipe.
                try:
                    self._read_reply(sock, clock, method, None)
                except RemoteError:
                    raise
                except (ClientError, AgentTimeout):
                    pass
                raise ClientError(f"cannot send to the agent on {self.path}: {_why(exc)}") from None
            return self._read_reply(sock, clock, method, on_progress)
        finally:
            sock.close()

    def _connect(self, clock: _Deadline) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        wait = min(self.connect_timeout, clock.left())
        try:
            _connect_within(sock, self.path, wait)
        except (FileNotFoundError, NotADirectoryError):
            sock.close()
            raise AgentUnreachable(
                f"no agent answers on {self.path}: the socket does not exist "
                "(is compute-agent running, with the same config files?)"
            ) from None
        except ConnectionRefusedError:
            sock.close()
            raise AgentUnreachable(
                f"no agent answers on {self.path}: nothing listens on it "
                "(a stale socket; is compute-agent running?)"
            ) from None
        except (TimeoutError, BlockingIOError):
            # A full listen backlog: the agent accepts nothing (stopped or hung).
            sock.close()
            raise AgentTimeout(
                f"no agent answers on {self.path}: no connection within {wait:g} s "
                "(is compute-agent stopped or hung?)"
            ) from None
        except PermissionError:
            sock.close()
            raise ClientError(
                f"permission denied on {self.path}: run as the agent's user (mode 0600)"
            ) from None
        except OSError as exc:
            sock.close()
            raise AgentUnreachable(f"no agent answers on {self.path}: {_why(exc)}") from None
        return sock

    def _timed_out(self, clock: _Deadline, method: str) -> AgentTimeout:
        hint = "" if method in READ_ONLY else "; the operation may still complete"
        return AgentTimeout(
            f"no answer from the agent on {self.path} after {clock.waited():.1f} s "
            f"(is compute-agent stopped or hung? see --timeout){hint}"
        )

    def _read_reply(
        self,
        sock: socket.socket,
        clock: _Deadline,
        method: str,
        on_progress: ProgressCallback | None,
    ) -> Any:
        buffer = bytearray()
        while True:
            end = buffer.find(b"\n")
            if end < 0:
                try:
                    _arm(sock, clock.left())
                    chunk = sock.recv(READ_SIZE)
                except TimeoutError:
                    raise self._timed_out(clock, method) from None
                except OSError as exc:
                    raise ClientError(f"connection to the agent lost: {_why(exc)}") from None
                if not chunk:
                    raise ClientError(
                        "the agent closed the connection before replying (is it stopping?)"
                    )
                buffer += chunk
                continue
            line = bytes(buffer[: end + 1])
            del buffer[: end + 1]
            try:
                message = protocol.parse_reply(line)
            except ProtocolError as exc:
                raise ClientError(str(exc)) from None
            if "progress" in message:
                clock.extend()
                if on_progress is not None:
                    on_progress(message["progress"]["done"], message["progress"]["total"])
                continue
            if message["ok"]:
                return message["result"]
            raise RemoteError(message["error"]["type"], message["error"]["message"])


class _Deadline:
    """One monotonic deadline; ``extend`` pushes it on, up to a hard limit."""

    def __init__(self, timeout: float, max_total: float) -> None:
        self.timeout = timeout
        self.started = time.monotonic()
        self.limit = self.started + max_total
        self.at = self.started + timeout

    def left(self) -> float:
        return self.at - time.monotonic()

    def extend(self) -> None:
        self.at = min(self.limit, max(self.at, time.monotonic() + self.timeout))

    def waited(self) -> float:
        return time.monotonic() - self.started


# How often a connect is retried while the agent's listen backlog is full.
_BACKLOG_RETRY_S = 0.01


def _connect_within(sock: socket.socket, path: str, wait: float) -> None:
    """Connect within ``wait`` s, retrying while the listen backlog is full.

    A UNIX socket's full backlog fails a connect with a timeout at once
    (EAGAIN), not when the timeout ends: a burst of clients (or an agent
    whose accepting thread has not run yet) is not an agent that is hung.
    """
    deadline = time.monotonic() + wait
    while True:
        _arm(sock, deadline - time.monotonic())
        try:
            sock.connect(path)
            return
        except BlockingIOError:
            if time.monotonic() + _BACKLOG_RETRY_S >= deadline:
                raise
        time.sleep(_BACKLOG_RETRY_S)


def _arm(sock: socket.socket, left: float) -> None:
    """Set the socket's timeout to what is left; TimeoutError when nothing is.

    A deadline spent before the next step (a tiny ``--timeout``) made
    ``settimeout`` raise ValueError; one far away (``--timeout 1e10``),
    OverflowError. Neither is a timeout the caller recognised.
    """
    if not left > 0:
        raise TimeoutError
    sock.settimeout(min(left, MAX_TOTAL))


def _why(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__
