"""The agent's side of the admin socket: a service component.

The socket is a local UNIX socket, mode 0600, so only the agent's own user
(and root) can connect: anyone who can, can stop every VM of the host.
It is created under a restrictive umask, so it is never wider than 0600,
not even between bind and chmod. Each connection is served in its own
greenthread and each request goes through the same :class:`Dispatcher` as
RPC, with ``admin=True`` and the CLI as the recorded source. Nothing a
client sends can end the server: a bad line gets an ``InvalidInput`` reply,
an unexpected error an error reply and a log line.

Nor can clients lock the CLI out: a request must arrive in full within
``request_timeout`` of the connection's start (a deadline for the line, not
for each receive), and at the connection limit a new connection takes the
place of the oldest one still sending its request; the CLI sends its
request at once, so it is served. Refusals and drops are counted for
``status`` and logged as one line per burst (:class:`RefusalLog`).

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
from dataclasses import asdict, dataclass
from typing import Any

from compute_agent import exception, green
from compute_agent.admin import protocol
from compute_agent.exception import AdminSocketError, Evicted, RequestTimeout, TooManyConnections
from compute_agent.intake import RefusalLog
from compute_agent.states import ActionSource
from compute_agent.utils import add_counts, printable

LOG = logging.getLogger(__name__)

SOCKET_MODE = 0o600
# How often a long call reports its progress to the client.
PROGRESS_INTERVAL = 0.5
# A long call repeats its progress at least this often, changed or not: the
# client's deadline runs between two lines.
KEEPALIVE = 5.0
# A request line must have arrived in full this long after the connection
# was accepted (or its previous reply sent); a slow or idle client is dropped.
REQUEST_TIMEOUT = 10.0
# Connections served at once. Past it, a new connection takes the place of
# the oldest one still sending its request; only when every connection runs
# a request are RESERVE more let in, then the rest refused.
MAX_CONNECTIONS = 64
RESERVE = 4
READ_SIZE = 65536
# How much of a connection's unread data eviction looks at for a whole request
# line: the CLI's requests are far shorter.
PEEK_SIZE = 4096
# Refused and dropped connections are summed up in one log line this often.
REFUSAL_LOG_WINDOW = 10.0
# Tasks kept waiting in accept() between connections (see _accept_loop);
# eventlet lets only one greenthread wait on a socket. Under threads, 8 did no
# better than 2 once the last accepter stopped waiting for its successor's
# thread to run (docs/benchmarks.md, "Both concurrency backends").
SPARE_ACCEPTERS = 1 if green.HAS_HUB else 2
# How long a refused connection's one error line may take to send.
REFUSAL_SEND_TIMEOUT = 1.0
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
        "set_service_disabled",
        "reap_deleted_instances",
    }
)


@dataclass(frozen=True)
class SocketStatistics:
    """The socket's connections (open, busy, most at once), requests, refusals and drops.

    ``accepting`` counts the tasks waiting in accept() now. It is 0 for a
    moment after the last of them takes a connection, until the successor it
    started is running (under threads, a thread start away); 0 for long
    means nothing accepts.
    """

    accepting: int
    open: int
    busy: int
    max_open: int
    limit: int
    reserve: int
    requests: int
    errors: int
    refused: int
    evicted: int
    timed_out: int


class AdminSocketServer:
    """Serves the admin socket from ``start`` to ``stop``; a service component."""

    def __init__(
        self,
        path: str,
        dispatcher: Any,
        *,
        grace: float = 3.0,
        progress_interval: float = PROGRESS_INTERVAL,
        request_timeout: float = REQUEST_TIMEOUT,
        max_connections: int = MAX_CONNECTIONS,
        reserve: int = RESERVE,
        keepalive: float = KEEPALIVE,
    ) -> None:
        self.path = path
        self.dispatcher = dispatcher
        self.grace = grace
        self.progress_interval = progress_interval
        self.request_timeout = request_timeout
        self.max_connections = max_connections
        self.reserve = reserve
        self.keepalive = keepalive
        self.refusals = RefusalLog(
            LOG,
            REFUSAL_LOG_WINDOW,
            first="admin socket: %(kind)s %(method)s: %(type)s: %(error)s",
            summary="admin socket: %(n)d more %(kind)ss %(method)s in the last %(window).0f s: "
            "%(type)s (last: %(last)s)",
            name="admin-refusal-log",
        )
        self.refused = 0
        self.evicted = 0
        self.timed_out = 0
        self.max_open = 0
        self._sock: socket.socket | None = None
        self._identity: tuple[int, int] | None = None  # (st_dev, st_ino) of our file
        # Tasks started to accept and not serving a connection (see _accept_loop),
        # and those of them waiting in accept() now.
        self._accepters = 0
        self._waiting: set[green.Task] = set()
        self._conns: set[_Connection] = set()
        # Under threads the accept loop and every connection change _conns at once.
        self._conns_lock = green.native_lock()
        self._closing = False
        self.requests = 0
        self.errors = 0

    # -- component life cycle ---------------------------------------------

    def listen(self) -> None:
        """Bind the socket (once); AdminSocketError if it cannot, or another agent answers on it.

        The agent calls this before its service starts, so that a second
        agent on the host stops before it touches the service row, libvirt
        or the message bus. Connections wait in the backlog until ``start``.
        """
        if self._sock is None:
            self._sock = self._bind()

    def start(self, service: Any = None) -> None:
        self.listen()
        for _ in range(SPARE_ACCEPTERS):
            self._spawn_accepter()
        LOG.info("admin socket listening on %s", self.path)

    def release(self) -> None:
        """Give up a socket that :meth:`listen` bound, when start-up fails after it."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._unlink_if_ours()

    def stop(self) -> None:
        """Stop accepting, let requests in flight finish for ``grace`` s, close the rest."""
        with self._conns_lock:
            if self._closing:
                return
            self._closing = True
            waiting = list(self._waiting)
        for task in waiting:
            task.cancel()
        if self._sock is not None:
            # A thread blocked in accept() (the threads backend) wakes only on a shutdown.
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            self._sock.close()
        self._unlink_if_ours()
        self.refusals.stop()
        deadline = green.monotonic() + self.grace
        while any(c.busy for c in self._open()) and green.monotonic() < deadline:
            green.sleep(0.05)
        left = sum(1 for c in self._open() if c.busy)
        if left:
            LOG.warning("closing %d admin connection(s) with a request still in flight", left)
        for conn in self._open():
            self._close(conn)
        LOG.info("admin socket closed")

    # -- binding ----------------------------------------------------------

    def _bind(self) -> socket.socket:
        path = self.path
        parent = os.path.dirname(path) or "."
        try:
            os.makedirs(parent, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise AdminSocketError(
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
            raise AdminSocketError(f"cannot bind admin_socket {path}: {exc.strerror}") from None
        finally:
            os.umask(old_umask)
        try:
            os.chmod(path, SOCKET_MODE)  # in case the file system ignores the umask
            st = os.lstat(path)
            self._identity = (st.st_dev, st.st_ino)
            sock.listen(16)
        except OSError as exc:
            sock.close()
            raise AdminSocketError(
                f"cannot listen on admin_socket {path}: {exc.strerror}"
            ) from None
        return sock

    @staticmethod
    def _remove_stale(path: str) -> None:
        """Remove a socket file left by a dead agent; refuse if one answers on it."""
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise AdminSocketError(f"cannot check admin_socket {path}: {exc.strerror}") from None
        if not stat.S_ISSOCK(st.st_mode):
            raise AdminSocketError(
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
            raise AdminSocketError(
                f"admin_socket {path} is in use by another process (it accepts no connection); "
                "is another compute-agent running?"
            ) from None
        except OSError as exc:
            raise AdminSocketError(f"cannot check admin_socket {path}: {exc.strerror}") from None
        else:
            raise AdminSocketError(
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
        """Accept a connection and serve it in this task; then accept again, or end.

        The task that accepts a connection serves it, and another task is
        already waiting in accept() for the next one: a new one is started
        only when none is left, and one ends after its connection if
        SPARE_ACCEPTERS others are accepting. Under threads every wake-up is
        a wait for the GIL behind each busy thread: this way a client's
        request waits for it once, when it is accepted (its request is read
        holding the GIL, and the last accepter starts the next one's thread
        without waiting for it to run). The request a client already sent is
        read before this task accepts again, so a flood of new connections
        cannot push a quick client out.
        """
        assert self._sock is not None
        me = green.current_task()
        assert me is not None
        while True:
            with self._conns_lock:
                if self._closing:
                    return
                self._waiting.add(me)
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
            finally:
                with self._conns_lock:
                    self._waiting.discard(me)
            with self._conns_lock:
                self._accepters -= 1
                alone = not self._accepters and not self._closing
            if alone:
                self._spawn_accepter()
            record = self._admit(conn, me)
            if record is None:
                with self._conns_lock:
                    self._accepters += 1
                continue
            green.name_current("admin-connection")
            self._serve(record)
            green.name_current("admin-socket")
            with self._conns_lock:
                # A dropped connection's task was cancelled: it must not serve again.
                if record.dropped or self._accepters >= SPARE_ACCEPTERS:
                    return
                self._accepters += 1

    def _spawn_accepter(self) -> None:
        with self._conns_lock:
            self._accepters += 1
        # The last accepter calls this before it serves its connection: it
        # must not wait for the new thread to run (see green.start_soon).
        green.start_soon(self._accept_loop, name="admin-socket")

    def _admit(self, conn: socket.socket, task: green.Task) -> _Connection | None:
        """Take the connection in, making room if needed; None: refused.

        A client that sends its request at once (the CLI) is never the one
        pushed out by clients that hold connections open: a connection whose
        request has arrived in full is not "still sending", even before its
        task has read it (under threads that task may wait for the GIL while
        other accepters admit a flood). Past the limit, only connections with
        a request are kept, and RESERVE more let in.

        The count is read and the slot taken in one hold: under threads two
        accepters admit at once, and each must see the other's connection.
        """
        record: _Connection | None = _Connection(conn, green.monotonic(), task)
        victim = None
        with self._conns_lock:
            open_now = len(self._conns)
            if open_now >= self.max_connections:
                oldest_first = sorted((c for c in self._conns if not c.busy), key=lambda c: c.since)
                victim = next((c for c in oldest_first if not c.request_arrived()), None)
                if victim is not None:
                    self._conns.discard(victim)
                    victim.dropped = True
                    self.evicted += 1
                elif open_now >= self.max_connections + self.reserve:
                    self.refused += 1
                    record = None
            if record is not None:
                self._conns.add(record)
                self.max_open = max(self.max_open, len(self._conns))
        if victim is not None:
            self.refusals.refused(
                "connection",
                "dropped",
                Evicted(
                    f"{open_now} connections open: the oldest one still sending "
                    f"its request ({victim.peer}) makes room for a new one"
                ),
            )
            self._close(victim)
        if record is None:
            self._refuse(conn, open_now)
        return record

    def _open(self) -> list[_Connection]:
        """The open connections, a snapshot another thread cannot change under the caller."""
        with self._conns_lock:
            return list(self._conns)

    @staticmethod
    def _close(record: _Connection) -> None:
        """End a connection from outside its task: cancel the task, shut the socket down.

        The shutdown wakes the task if it waits for the socket (a close alone
        does not end a native thread's poll() on it), and the task closes the
        socket itself as it ends. Only a socket no task uses is closed here:
        one closed under a running task frees its descriptor's number for the
        next accept while the task may still call recv or send on that number.
        """
        if record.thread is not None:
            record.thread.cancel()
        with contextlib.suppress(OSError):
            record.sock.shutdown(socket.SHUT_RDWR)
        if record.thread is None or record.thread.done():
            record.sock.close()

    def _refuse(self, conn: socket.socket, open_now: int) -> None:
        message = f"the agent already runs requests on {open_now} admin connections"
        self.refusals.refused("connection", "refused", TooManyConnections(message))
        with contextlib.suppress(OSError):
            green.send_by(
                conn,
                protocol.encode(protocol.error("TooManyConnections", message)),
                green.monotonic() + REFUSAL_SEND_TIMEOUT,
            )
        conn.close()

    def _serve(self, record: _Connection) -> None:
        conn = record.sock
        record.peer = peer = _peer(conn)
        reader = record.reader
        try:
            while not self._closing:
                try:
                    line = reader.line(record.since + self.request_timeout)
                except _TooSlow:
                    add_counts(self._conns_lock, self, timed_out=1)
                    self.refusals.refused(
                        "connection",
                        "dropped",
                        RequestTimeout(
                            f"no full request within {self.request_timeout:g} s ({peer})"
                        ),
                    )
                    return
                if line is None:
                    return  # the client is done
                if len(line) > protocol.MAX_REQUEST_BYTES:
                    # The rest of the line cannot be told from the next request.
                    self._send(conn, _error_reply(_too_long()))
                    return
                if not line.strip():
                    reader.line_taken = False
                    continue
                record.busy = True
                reader.line_taken = False  # busy says it from here
                try:
                    self._request(conn, line, peer)
                finally:
                    record.busy = False
                    record.since = green.monotonic()  # the next request's clock
        except OSError as exc:
            LOG.debug("admin connection (%s) lost: %s", peer, exc)
        finally:
            with self._conns_lock:
                self._conns.discard(record)
            conn.close()

    def statistics(self) -> SocketStatistics:
        conns = self._open()
        with self._conns_lock:
            accepting = sum(1 for task in self._waiting if not task.done())
        return SocketStatistics(
            accepting=accepting,
            open=len(conns),
            busy=sum(1 for c in conns if c.busy),
            max_open=self.max_open,
            limit=self.max_connections,
            reserve=self.reserve,
            requests=self.requests,
            errors=self.errors,
            refused=self.refused,
            evicted=self.evicted,
            timed_out=self.timed_out,
        )

    def _request(self, conn: socket.socket, line: bytes, peer: str) -> None:
        try:
            method, args = protocol.parse_request(line)
        except exception.InvalidInput as exc:
            add_counts(self._conns_lock, self, errors=1)
            # A flood of junk lines is one log line per burst, not one each.
            self.refusals.refused("request", "rejected", exception.InvalidInput(f"{exc} ({peer})"))
            self._send(conn, _error_reply(exc))
            return
        add_counts(self._conns_lock, self, requests=1)
        level = logging.INFO if method in MUTATING else logging.DEBUG
        LOG.log(level, "admin request %s %s (%s)", printable(method), _brief(args), peer)
        watch = self._progress_source(method, args)
        if watch is None:
            reply = self._call(method, args)
        else:
            reply = self._call_with_progress(conn, method, args, watch)
        if not reply["ok"]:
            add_counts(self._conns_lock, self, errors=1)
        self._send(conn, reply)

    def _call(self, method: str, args: dict[str, Any]) -> dict[str, Any]:
        """Run one request; always a reply, never an exception."""
        try:
            result = self.dispatcher.call(method, args, ActionSource.CLI, admin=True)
            if method == "status":  # admin only: the socket that serves it adds itself
                result["admin_socket"] = asdict(self.statistics())
        except exception.Stopping as exc:
            LOG.warning("admin request %s not completed: %s", method, exc)
            return _error_reply(exc)
        except exception.ComputeAgentError as exc:
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
        future = green.submit(self._call, method, args, name=f"admin-{method}")
        last: tuple[int, int] | None = None
        listening = True
        sent_at = green.monotonic()
        while True:
            try:
                reply: dict[str, Any] = future.result(timeout=self.progress_interval)
                break
            except TimeoutError:
                pass
            now = watch()
            due = green.monotonic() - sent_at >= self.keepalive
            if listening and ((now is not None and now != last) or due):
                if now is not None:
                    last = now
                # Before the run starts (queued behind another): 0/0.
                listening = self._send(conn, protocol.progress(*(last or (0, 0))))
                sent_at = green.monotonic()
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
            done, total = manager.power_sync.statistics().progress
            return int(done), int(total)

        return watch

    def _send(self, conn: socket.socket, message: dict[str, Any]) -> bool:
        """Send one message; False if the client has gone (its request goes on)."""
        try:
            green.send_by(conn, protocol.encode(message), green.monotonic() + self.request_timeout)
        except OSError as exc:
            LOG.debug("admin client gone before its reply: %s", exc)
            return False
        return True


class _Connection:
    """One client connection: its socket, its greenthread, whether a request runs.

    ``since`` is when its current request's clock started: the accept, or
    the reply to its previous request.
    """

    def __init__(self, sock: socket.socket, since: float, thread: green.Task | None) -> None:
        self.sock = sock
        self.since = since
        self.peer = "peer unknown"
        self.thread = thread
        self.busy = False
        self.dropped = False
        self.reader = _LineReader(sock)

    def request_arrived(self) -> bool:
        """Whether a whole request line has arrived, whether its task has read it or not.

        Never waits. It looks where the line can be on its way to ``busy``:
        the socket (a peek), the reader's buffer, the line just taken.
        """
        reader = self.reader
        if reader.line_taken or b"\n" in reader.buffer:
            return True
        try:
            return b"\n" in green.peek(self.sock, PEEK_SIZE)
        except OSError:
            return False  # shut down meanwhile: nothing will be read from it


class _TooSlow(Exception):
    """The request line did not arrive in full before its deadline."""


class _LineReader:
    """Request lines from a socket, each by an absolute deadline.

    The deadline holds for the whole line, not for each receive: a client
    sending a byte a second cannot hold its connection for longer.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = bytearray()
        self.eof = False
        self.line_taken = False  # a line was returned; its connection not yet marked busy

    def line(self, deadline: float) -> bytes | None:
        """The next line (at most MAX_REQUEST_BYTES + 1 bytes of it); None at the end."""
        limit = protocol.MAX_REQUEST_BYTES + 1
        while True:
            end = self.buffer.find(b"\n", 0, limit)
            if end >= 0 or len(self.buffer) >= limit or (self.eof and self.buffer):
                size = end + 1 if end >= 0 else min(len(self.buffer), limit)
                line = bytes(self.buffer[:size])
                self.line_taken = True  # before it leaves the buffer (see request_arrived)
                del self.buffer[:size]
                return line
            if self.eof:
                return None
            before = len(self.buffer)
            try:
                # Straight into the buffer, where request_arrived looks.
                self.buffer += green.recv_by(self.sock, READ_SIZE, deadline)
            except TimeoutError:
                raise _TooSlow() from None
            if len(self.buffer) == before:
                self.eof = True


def _error_reply(exc: BaseException) -> dict[str, Any]:
    return protocol.error(*exception.operator_error(exc))


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
