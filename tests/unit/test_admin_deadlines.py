# ruff: noqa: F811 - the fixtures agent and sock_path come from test_admin_socket
"""Deadlines on both ends of the admin socket, and room for the CLI under a flood.

The client: one deadline for the whole call, pushed on only by progress
lines. The server: a request must arrive in full within its deadline, and
a new connection takes the place of the oldest one still sending.
"""

import logging
import socket
import time

import pytest

from compute_agent import green
from compute_agent.admin import protocol
from compute_agent.admin.client import AdminClient, _Deadline
from compute_agent.admin.server import AdminSocketServer
from compute_agent.exception import AgentTimeout, RemoteError
from tests.unit.test_admin_socket import agent, sock_path  # noqa: F401 - fixtures

# Generous: a loaded 2-core machine may be late, never early.
SLACK = 5.0


class FakeAgent:
    """A listener that accepts and then does what ``behave(conn)`` says."""

    def __init__(self, path, behave):
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(4)
        self.behave = behave
        self.thread = green.spawn(self._run)

    def _run(self):
        conn, _ = self.listener.accept()
        try:
            self.behave(conn)
        finally:
            conn.close()

    def close(self):
        green.kill(self.thread)
        self.listener.close()


def timed(fn, *args, **kwargs):
    started = time.monotonic()
    try:
        return fn(*args, **kwargs), time.monotonic() - started
    except Exception as exc:  # noqa: BLE001 - returned to the test
        return exc, time.monotonic() - started


def test_an_agent_that_accepts_and_never_answers_times_out(sock_path):
    fake = FakeAgent(sock_path, lambda conn: green.sleep(60))
    try:
        result, took = timed(AdminClient(sock_path, timeout=0.5).call, "status")
    finally:
        fake.close()
    assert isinstance(result, AgentTimeout), result
    assert f"no answer from the agent on {sock_path} after" in str(result)
    assert "may still complete" not in str(result)  # status changes nothing
    assert 0.5 <= took < 0.5 + SLACK


def test_a_trickling_agent_cannot_stretch_the_deadline(sock_path):
    def trickle(conn):
        conn.recv(1024)
        for byte in b'{"ok": true, "result": "never ends"':
            conn.sendall(bytes([byte]))
            green.sleep(0.1)

    fake = FakeAgent(sock_path, trickle)
    try:
        result, took = timed(AdminClient(sock_path, timeout=0.5).call, "stop_instance")
    finally:
        fake.close()
    assert isinstance(result, AgentTimeout), result
    assert "the operation may still complete" in str(result)
    assert took < 0.5 + SLACK


def test_progress_lines_keep_a_long_call_waiting(sock_path):
    def working(conn):
        conn.recv(1024)
        for done in range(8):  # 1.6 s in all, 0.2 s between lines
            conn.sendall(protocol.encode(protocol.progress(done, 8)))
            green.sleep(0.2)
        conn.sendall(protocol.encode(protocol.ok({"checked": 8})))

    fake = FakeAgent(sock_path, working)
    seen = []
    try:
        result = AdminClient(sock_path, timeout=0.8).call(
            "sync_power_states", on_progress=lambda d, t: seen.append(d)
        )
    finally:
        fake.close()
    assert result == {"checked": 8}
    assert seen == list(range(8))


def test_progress_cannot_extend_past_the_overall_limit(sock_path):
    def forever(conn):
        conn.recv(1024)
        while True:
            conn.sendall(protocol.encode(protocol.progress(0, 1)))
            green.sleep(0.1)

    fake = FakeAgent(sock_path, forever)
    try:
        result, took = timed(
            AdminClient(sock_path, timeout=0.3, max_total=1.0).call, "sync_power_states"
        )
    finally:
        fake.close()
    assert isinstance(result, AgentTimeout), result
    assert 1.0 <= took < 1.0 + SLACK


# -- the server -------------------------------------------------------------


@pytest.fixture
def small_server(agent, sock_path):
    srv = AdminSocketServer(
        sock_path, agent, grace=0.5, request_timeout=1.0, max_connections=4, reserve=1
    )
    srv.start()
    yield srv
    srv.stop()


def connect(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(path)
    return s


def closed_by_server(s, deadline=10.0):
    """True once the server has closed ``s`` (EOF or reset), within ``deadline`` s."""
    s.settimeout(deadline)
    try:
        while s.recv(1024):
            pass
    except ConnectionResetError:
        pass
    except TimeoutError:
        return False
    return True


def wait_for(condition, timeout=10.0):
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "condition not met in time"
        green.sleep(0.02)


def test_a_client_sending_a_byte_at_a_time_is_dropped_at_the_request_deadline(
    small_server,
    sock_path,
):
    slow = connect(sock_path)
    started = time.monotonic()

    def dribble():
        for byte in protocol.request("ping"):
            try:
                slow.sendall(bytes([byte]))
            except OSError:
                return
            green.sleep(0.2)  # 0.2 s a byte: the line would take seconds

    writer = green.spawn(dribble)
    try:
        assert closed_by_server(slow)
        assert time.monotonic() - started < 1.0 + SLACK
    finally:
        green.kill(writer)
        slow.close()
    wait_for(lambda: small_server.statistics().timed_out == 1)
    assert small_server.statistics().open == 0


def test_an_idle_connection_is_dropped_and_a_quick_one_answered(small_server, sock_path):
    idle = connect(sock_path)
    try:
        assert AdminClient(sock_path, timeout=5).call("ping")["host"] == "test-host"
        assert closed_by_server(idle)
    finally:
        idle.close()


def test_the_cli_gets_through_connections_held_open(small_server, sock_path, caplog):
    caplog.set_level(logging.INFO, logger="compute_agent.admin.server")
    holders = [connect(sock_path) for _ in range(12)]  # three times the limit
    try:
        for _ in range(3):
            assert AdminClient(sock_path, timeout=5).call("ping")["host"] == "test-host"
        stats = small_server.statistics()
        assert stats.evicted >= 12 - 4 + 1  # the holders past 4, then one for a ping
        assert stats.open <= 4
        assert stats.refused == 0
    finally:
        for s in holders:
            s.close()
    # Counted, not one line each: the first drop in full, the rest summed up later.
    drops = [r for r in caplog.records if "connection dropped" in r.getMessage()]
    assert len(drops) == 1, [r.getMessage() for r in drops]
    small_server.refusals.flush()
    assert any("more connections dropped in the last" in r.getMessage() for r in caplog.records)


def test_a_connection_whose_request_arrived_is_not_evicted_before_its_task_reads_it(
    agent, sock_path
):
    """Under threads a connection's task may wait for the GIL between its
    admission and its read while other accepters admit a flood: the CLI's
    connection then looked like the oldest one still sending and was pushed
    out (seen once under make check). A request that has arrived in full
    is not still sending, read or not."""
    srv = AdminSocketServer(sock_path, agent, max_connections=2, reserve=0)
    pairs = [socket.socketpair() for _ in range(4)]  # (the server's end, the client's)
    (cli, cli_client), (older, _), (newer, newer_client), (new, _) = pairs
    try:
        cli_record = srv._admit(cli, None)
        idle_record = srv._admit(older, None)
        cli_client.sendall(protocol.request("ping"))  # sent, not read by its task yet
        assert cli_record.since <= idle_record.since
        assert srv._admit(newer, None) is not None  # at the limit: one must go
        assert idle_record.dropped and not cli_record.dropped
        assert srv.statistics().evicted == 1
        # Only connections with a whole request left, and no reserve: refused.
        newer_client.sendall(protocol.request("ping"))
        assert srv._admit(new, None) is None
        assert srv.statistics().refused == 1 and not cli_record.dropped
    finally:
        srv.refusals.stop()
        for a, b in pairs:
            a.close()
            b.close()


def test_a_connection_ended_from_outside_its_running_task_is_shut_down_not_closed(agent, sock_path):
    """Its task may be about to read or write by the descriptor's number, and a
    close frees that number for the next accepted connection: the task closes
    its socket itself. A connection no task serves is closed at once."""

    class Running:
        cancelled = False

        def cancel(self):
            self.cancelled = True

        def done(self):
            return False

    ours, client = socket.socketpair()
    idle, idle_client = socket.socketpair()
    srv = AdminSocketServer(sock_path, agent)
    task = Running()
    try:
        record = srv._admit(ours, task)
        srv._close(record)
        assert task.cancelled
        assert ours.fileno() >= 0  # still open: its task closes it
        client.settimeout(5)
        assert client.recv(10) == b""  # but shut down: the client sees the end
        srv._close(srv._admit(idle, None))
        assert idle.fileno() == -1
    finally:
        srv.refusals.stop()
        for s in (ours, client, idle, idle_client):
            s.close()


def test_when_every_connection_runs_a_request_the_reserve_then_a_refusal(
    small_server,
    sock_path,
    agent,
    monkeypatch,
):
    release = green.Event()
    monkeypatch.setattr(agent.manager, "list_instances", lambda: [] if release.wait() else [])
    calls = []
    try:
        # One at a time: a connection whose request is not read yet would be the
        # oldest still sending, and the next one would push it out.
        for n in range(1, 6):
            calls.append(green.spawn(AdminClient(sock_path, timeout=30).call, "list_instances"))
            wait_for(lambda n=n: small_server.statistics().busy == n)  # 4 + the reserved one
        with pytest.raises(RemoteError, match="TooManyConnections"):
            AdminClient(sock_path, timeout=5).call("ping")
        assert small_server.statistics().refused == 1
    finally:
        release.set()
    assert all(c.wait() == [] for c in calls)
    assert AdminClient(sock_path, timeout=5).call("ping")["host"] == "test-host"


def test_a_long_call_repeats_its_progress_as_a_keepalive(agent, sock_path, monkeypatch):
    srv = AdminSocketServer(sock_path, agent, grace=0.5, progress_interval=0.05, keepalive=0.2)
    srv.start()
    release = green.Event()
    real = agent.manager.sync_power_states

    def stuck_sync(instance_uuid=None, timeout=None):
        release.wait()
        return real(instance_uuid)

    monkeypatch.setattr(agent.manager, "sync_power_states", stuck_sync)
    seen = []
    try:
        call = green.spawn(
            AdminClient(sock_path, timeout=0.6).call,
            "sync_power_states",
            on_progress=lambda d, t: seen.append((d, t)),
        )
        wait_for(lambda: len(seen) >= 6)  # more than the client's timeout of silence
        release.set()
        summary = call.wait()
    finally:
        release.set()
        srv.stop()
    assert "checked" in summary
    assert (0, 0) in seen  # nothing counted yet: still a line


def test_status_shows_the_socket_figures_and_unknown_domains(small_server, sock_path, agent):
    agent.manager.driver.add_domain("stray", "00000000-0000-4000-8000-00000000abcd")
    AdminClient(sock_path, timeout=30).call("sync_power_states")
    status = AdminClient(sock_path, timeout=5).call("status")
    assert status["unknown_domains"]["count"] == 1
    assert status["unknown_domains"]["names"] == ["stray"]
    assert status["unknown_domains"]["checked_at"].endswith("Z")
    assert status["admin_socket"]["limit"] == 4
    assert status["admin_socket"]["requests"] >= 2


def test_a_refusal_is_reported_even_when_the_send_breaks(sock_path):
    def refuse(conn):
        conn.sendall(protocol.encode(protocol.error("TooManyConnections", "64 already")))

    fake = FakeAgent(sock_path, refuse)  # closes without reading the request
    try:
        with pytest.raises(RemoteError, match="TooManyConnections: 64 already"):
            # Larger than the socket's buffers: the send fails on the closed peer.
            AdminClient(sock_path, timeout=5).call("ping", {"pad": "x" * 4_000_000})
    finally:
        fake.close()


def test_a_full_listen_backlog_is_waited_out_not_reported_at_once(sock_path):
    """A UNIX socket fails a timed connect at once (EAGAIN) while the backlog is full:
    a burst of clients (20 pings under the threads backend) was told "no agent"."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(sock_path)
    listener.listen(1)
    queued = []
    while True:  # fill the backlog with connections nobody accepts yet
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            s.connect(sock_path)
        except BlockingIOError:
            s.close()
            break
        queued.append(s)

    def accept_later():
        time.sleep(0.3)
        for _ in range(len(queued) + 1):
            listener.accept()[0].close()

    acceptor = green.native_thread(accept_later, name="acceptor")
    try:
        sock, took = timed(AdminClient(sock_path, timeout=5)._connect, _Deadline(5, 5))
        assert isinstance(sock, socket.socket), sock
        sock.close()
        assert 0.2 < took < SLACK
    finally:
        acceptor.join(5)
        for s in queued:
            s.close()
        listener.close()


def test_accepters_admitting_at_once_never_pass_the_limit(agent, sock_path):
    """Under threads two accepters admit at once: each must see the other's
    connection (the count was read, then the slot taken, in two holds: 6 open of 4)."""
    from tests.unit.hammer import hammer

    srv = AdminSocketServer(sock_path, agent, grace=0.5, max_connections=4, reserve=1)
    pairs = [socket.socketpair() for _ in range(8 * 50)]
    open_seen: list[int] = []

    def work(i: int) -> None:
        for ours, _ in pairs[i * 50 : (i + 1) * 50]:
            assert srv._admit(ours, None) is not None  # idle ones give way: never refused
            open_seen.append(len(srv._open()))

    try:
        hammer(work)
        assert max(open_seen) <= 4
        stats = srv.statistics()
        assert (stats.open, stats.evicted, stats.refused) == (4, len(pairs) - 4, 0)
    finally:
        for ours, theirs in pairs:
            ours.close()
            theirs.close()
        srv.refusals.flush()
