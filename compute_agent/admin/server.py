"""The agent's side of the admin socket: a service component.

The socket is a local UNIX socket, mode 0600, so only the agent's own user
(and root) can connect: anyone who can, can stop every VM of the host.
It is created under a restrictive umask, so it is never wider than 0600,
not even between bind and chmod. Each connection is served in its own
greenthread and each request goes through the same :class:`Dispatcher` as
RPC, with ``admin=True`` and the CLI as the recorded source. Nothing a
client sends can end the server: a bad line gets an ``InvalidInput`` reply,
an unexpected error an error reply and a log line.

The agent monkey-patches the standard library before anything else, so the
``socket`` module used here is eventlet's green one: a blocked accept or
read only parks its greenthread.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import stat
import struct
from collections.abc import Callable
from typing import Any

from compute_agent import exception, green
from compute_agent.admin import protocol
from compute_agent.cmd.common import Fatal
from compute_agent.periodic import TaskStopped
from compute_agent.states import ActionSource
from compute_agent.utils import printable

LOG = logging.getLogger(__name__)

SOCKET_MODE = 0o600
# How often a long call reports its progress to the client.
PROGRESS_INTERVAL = 0.5
# A connection that sends nothing for this long is closed.
IDLE_TIMEOUT = 300.0
# Connections served at once; more are refused with an error reply.
MAX_CONNECTIONS = 64
# How long start-up waits for an answer on an existing socket file.
PROBE_TIMEOUT = 1.0
# Requests logged at INFO (they change something); the others at DEBUG.
MUTATING = frozenset(
    {
        "build_instance",
        "start_instance",
        "stop_instance",
        "reboot_instance",
        "delete_instance",
        "sync_power_states",
        "reap_deleted_instances",
    }
)


class AdminSocketServer:
    """Serves the admin socket from ``start`` to ``stop``; a service component."""

    def __init__(
        self,
        path: str,
        dispatcher: Any,
        *,
        grace: float = 3.0,
        progress_interval: float = PROGRESS_INTERVAL,
        idle_timeout: float = IDLE_TIMEOUT,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self.path = path
        self.dispatcher = dispatcher
        self.grace = grace
        self.progress_interval = progress_interval
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        self._sock: socket.socket | None = None
        self._identity: tuple[int, int] | None = None  # (st_dev, st_ino) of our file
        self._accepter: green.GreenThread | None = None
        self._conns: set[_Connection] = set()
        self._closing = False
        self.requests = 0
        self.errors = 0

    # -- component life cycle ---------------------------------------------

    def listen(self) -> None:
        """Bind the socket (once); refuse with Fatal if another agent answers on it.

        The agent calls this before its service starts, so that a second
        agent on the host stops before it touches the service row, libvirt
        or the message bus. Connections wait in the backlog until ``start``.
        """
        if self._sock is None:
            self._sock = self._bind()

    def start(self, service: Any = None) -> None:
        self.listen()
        self._accepter = green.spawn(self._accept_loop, name="admin-socket")
        LOG.info("admin socket listening on %s", self.path)

    def release(self) -> None:
        """Give up a socket that :meth:`listen` bound, when start-up fails after it."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._unlink_if_ours()

    def stop(self) -> None:
        """Stop accepting, let requests in flight finish for ``grace`` s, close the rest."""
        if self._closing:
            return
        self._closing = True
        if self._accepter is not None:
            green.kill(self._accepter)
        if self._sock is not None:
            self._sock.close()
        self._unlink_if_ours()
        deadline = green.monotonic() + self.grace
        while any(c.busy for c in self._conns) and green.monotonic() < deadline:
            green.sleep(0.05)
        left = sum(1 for c in self._conns if c.busy)
        if left:
            LOG.warning("closing %d admin connection(s) with a request still in flight", left)
        for conn in list(self._conns):
            if conn.thread is not None:
                green.kill(conn.thread)
            conn.sock.close()  # a thread killed before it ran never closes it
        LOG.info("admin socket closed")

    # -- binding ----------------------------------------------------------

    def _bind(self) -> socket.socket:
        path = self.path
        parent = os.path.dirname(path) or "."
        try:
            os.makedirs(parent, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise Fatal(
                f"cannot create the directory of admin_socket {path}: {exc.strerror}"
            ) from None
        self._remove_stale(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # umask is process-wide, but nothing yields between these lines, so
        # no other greenthread creates a file under it.
        old_umask = os.umask(0o177)
        try:
            sock.bind(path)
        except OSError as exc:
            sock.close()
            raise Fatal(f"cannot bind admin_socket {path}: {exc.strerror}") from None
        finally:
            os.umask(old_umask)
        try:
            os.chmod(path, SOCKET_MODE)  # in case the file system ignores the umask
            st = os.lstat(path)
            self._identity = (st.st_dev, st.st_ino)
            sock.listen(16)
        except OSError as exc:
            sock.close()
            raise Fatal(f"cannot listen on admin_socket {path}: {exc.strerror}") from None
        return sock

    @staticmethod
    def _remove_stale(path: str) -> None:
        """Remove a socket file left by a dead agent; refuse if one answers on it."""
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise Fatal(f"cannot check admin_socket {path}: {exc.strerror}") from None
        if not stat.S_ISSOCK(st.st_mode):
            raise Fatal(
                f"admin_socket {path} exists and is not a socket; "
                "remove it or set [DEFAULT] admin_socket"
            )
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(PROBE_TIMEOUT)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            pass  # nobody listens: a dead agent's socket
        except TimeoutError:
            raise Fatal(
                f"admin_socket {path} is in use by another process (it accepts no connection); "
                "is another compute-agent running?"
            ) from None
        except OSError as exc:
            raise Fatal(f"cannot check admin_socket {path}: {exc.strerror}") from None
        else:
            raise Fatal(
                f"another compute-agent is already listening on admin_socket {path}; "
                "stop it first, or give this one another state_path or admin_socket"
            )
        finally:
            probe.close()
        LOG.info("removing the stale admin socket %s left by an agent that is gone", path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)

    def _unlink_if_ours(self) -> None:
        """Remove the socket file unless another process has put its own there since."""
        try:
            st = os.lstat(self.path)
        except OSError:
            return
        if (st.st_dev, st.st_ino) == self._identity:
            with contextlib.suppress(OSError):
                os.unlink(self.path)

    # -- connections ------------------------------------------------------

    def _accept_loop(self) -> None:
        assert self._sock is not None
        while not self._closing:
            try:
                conn, _ = self._sock.accept()
            except OSError as exc:
                if self._closing:
                    return
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    LOG.error("admin socket cannot accept a connection: %s", exc.strerror)
                    green.sleep(0.1)  # out of descriptors: let some close
                    continue
                LOG.error("admin socket stopped accepting: %s", exc)
                return
            if len(self._conns) >= self.max_connections:
                self._refuse(conn)
                continue
            record = _Connection(conn)
            self._conns.add(record)
            record.thread = green.spawn(self._serve, record, name="admin-connection")

    def _refuse(self, conn: socket.socket) -> None:
        LOG.warning("refusing an admin connection: %d already open", self.max_connections)
        conn.settimeout(1.0)
        with contextlib.suppress(OSError):
            conn.sendall(
                protocol.encode(
                    protocol.error(
                        "TooManyConnections",
                        f"the agent already serves {self.max_connections} admin connections",
                    )
                )
            )
        conn.close()

    def _serve(self, record: _Connection) -> None:
        conn = record.sock
        peer = _peer(conn)
        conn.settimeout(self.idle_timeout)
        reader = conn.makefile("rb")
        try:
            while not self._closing:
                line = reader.readline(protocol.MAX_REQUEST_BYTES + 1)
                if not line:
                    return  # the client is done
                if len(line) > protocol.MAX_REQUEST_BYTES:
                    # The rest of the line cannot be told from the next request.
                    self._send(conn, _error_reply(_too_long()))
                    return
                if not line.strip():
                    continue
                record.busy = True
                try:
                    self._request(conn, line, peer)
                finally:
                    record.busy = False
        except TimeoutError:
            LOG.debug("closing an admin connection idle for %.0f s (%s)", self.idle_timeout, peer)
        except OSError as exc:
            LOG.debug("admin connection (%s) lost: %s", peer, exc)
        finally:
            self._conns.discard(record)
            reader.close()
            conn.close()

    def _request(self, conn: socket.socket, line: bytes, peer: str) -> None:
        try:
            method, args = protocol.parse_request(line)
        except exception.InvalidInput as exc:
            self.errors += 1
            LOG.warning("bad admin request (%s): %s", peer, exc)
            self._send(conn, _error_reply(exc))
            return
        self.requests += 1
        level = logging.INFO if method in MUTATING else logging.DEBUG
        LOG.log(level, "admin request %s %s (%s)", printable(method), _brief(args), peer)
        watch = self._progress_source(method, args)
        if watch is None:
            reply = self._call(method, args)
        else:
            reply = self._call_with_progress(conn, method, args, watch)
        if not reply["ok"]:
            self.errors += 1
        self._send(conn, reply)

    def _call(self, method: str, args: dict[str, Any]) -> dict[str, Any]:
        """Run one request; always a reply, never an exception."""
        try:
            result = self.dispatcher.call(method, args, ActionSource.CLI, admin=True)
        except exception.ComputeAgentError as exc:
            return _error_reply(exc)
        except TaskStopped as exc:
            LOG.warning("admin request %s not completed: %s", method, exc)
            return _error_reply(exc)
        except Exception as exc:  # reported to the caller; never ends the server
            LOG.exception("admin request %s failed", method)
            return _error_reply(exc)
        return protocol.ok(result)

    def _call_with_progress(
        self,
        conn: socket.socket,
        method: str,
        args: dict[str, Any],
        watch: Callable[..., tuple[int, int] | None],
    ) -> dict[str, Any]:
        """Run the call in its own greenthread and report its progress meanwhile."""
        future = green.Future()
        green.spawn(lambda: future.set_result(self._call(method, args)), name=f"admin-{method}")
        last: tuple[int, int] | None = None
        listening = True
        while True:
            try:
                reply = future.result(timeout=self.progress_interval)
                break
            except TimeoutError:
                pass
            now = watch()
            if listening and now is not None and now != last:
                last = now
                listening = self._send(conn, protocol.progress(*now))
        # The final count, so the client's display ends on where the run ended.
        now = watch(final=True) if reply["ok"] else None
        if listening and now is not None and now != last:
            self._send(conn, protocol.progress(*now))
        return reply

    def _progress_source(self, method: str, args: dict[str, Any]) -> Callable[..., Any] | None:
        """What reports the progress of this request, if it is a long one."""
        if method != "sync_power_states" or args.get("instance_uuid") is not None:
            return None
        manager, service = self.dispatcher.manager, self.dispatcher.service
        task = service.runner.tasks.get("power_sync") if service is not None else None

        def watch(final: bool = False) -> tuple[int, int] | None:
            # Between runs, progress holds the previous run's count: not ours.
            if task is None or not (final or task.running):
                return None
            done, total = manager.power_sync.progress
            return int(done), int(total)

        return watch

    def _send(self, conn: socket.socket, message: dict[str, Any]) -> bool:
        """Send one message; False if the client has gone (its request goes on)."""
        try:
            conn.sendall(protocol.encode(message))
        except OSError as exc:
            LOG.debug("admin client gone before its reply: %s", exc)
            return False
        return True


class _Connection:
    """One client connection: its socket, its greenthread, whether a request runs."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.thread: green.GreenThread | None = None
        self.busy = False


def _error_reply(exc: BaseException) -> dict[str, Any]:
    message = exc.message if isinstance(exc, exception.ComputeAgentError) else str(exc)
    return protocol.error(type(exc).__name__, message or type(exc).__name__)


def _too_long() -> exception.InvalidInput:
    return exception.InvalidInput(
        f"request line longer than {protocol.MAX_REQUEST_BYTES} bytes; connection closed"
    )


def _peer(conn: socket.socket) -> str:
    """Who is on the other end (pid and uid), for the log."""
    try:
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, _gid = struct.unpack("3i", creds)
    except (OSError, AttributeError, struct.error):
        return "peer unknown"
    return f"pid {pid}, uid {uid}"


def _brief(args: dict[str, Any]) -> str:
    text = ", ".join(f"{printable(k, 40)}={v!r:.80}" for k, v in args.items())
    return f"({text})" if text else ""
