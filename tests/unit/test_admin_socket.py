"""The admin socket in-process: mode, framing, bad input, concurrency, ownership."""

import contextlib
import json
import logging
import os
import shutil
import socket
import stat
import statistics
import subprocess
import sys
import tempfile
import threading
import uuid

import pytest

from compute_agent import green
from compute_agent.admin import protocol
from compute_agent.admin import server as server_module
from compute_agent.admin.client import AdminClient
from compute_agent.admin.server import AdminSocketServer
from compute_agent.dispatch import Dispatcher
from compute_agent.exception import (
    AdminSocketError,
    AgentTimeout,
    AgentUnreachable,
    ClientError,
    RemoteError,
)
from compute_agent.manager import ComputeManager
from compute_agent.service import NodeService
from compute_agent.states import PowerState
from compute_agent.virt.fake import FakeDriver
from tests.helpers import create_instance, wait_until


@pytest.fixture
def sock_path():
    # pytest's tmp_path can exceed the 107 bytes of a UNIX socket address.
    d = tempfile.mkdtemp(prefix="ca-admin-")
    yield os.path.join(d, "admin.sock")
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def agent(conf, sqlite_db):
    conf.set_override("stats_interval", 0, group="compute")
    conf.set_override("sync_power_state_concurrency", 1, group="compute")
    driver = FakeDriver()
    manager = ComputeManager(conf, sqlite_db, driver)
    service = NodeService(conf, sqlite_db, components=[manager])
    service.start()
    # Let the first (start-up) power sync finish, so a test's sync is the only run.
    first = service.runner.tasks["power_sync"]
    while first.runs == 0:
        green.sleep(0.01)
    yield Dispatcher(manager, service)
    service.stop()
    # The option groups are module objects shared by every ConfigOpts: undo.
    conf.clear_override("stats_interval", group="compute")
    conf.clear_override("sync_power_state_concurrency", group="compute")


@pytest.fixture
def server(agent, sock_path):
    srv = AdminSocketServer(sock_path, agent, grace=0.5, progress_interval=0.05)
    srv.start()
    yield srv
    srv.stop()


def raw(path, *lines, timeout=5.0):
    """Send raw lines on one connection; return the decoded reply lines."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        # A server that closes first (a refused line) may do so while the rest is sent
        # (under threads it reads in parallel): its replies are still there to read.
        try:
            for line in lines:
                s.sendall(line)
            s.shutdown(socket.SHUT_WR)
        except BrokenPipeError:
            pass
        data = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := s.recv(65536):
                data += chunk
    return [json.loads(x) for x in data.splitlines()]


def test_socket_is_0600_even_under_an_open_umask(agent, sock_path):
    old = os.umask(0)
    try:
        srv = AdminSocketServer(sock_path, agent)
        srv.start()
    finally:
        os.umask(old)
    try:
        mode = os.stat(sock_path).st_mode
        assert stat.S_ISSOCK(mode)
        assert stat.S_IMODE(mode) == 0o600
        assert AdminClient(sock_path).call("ping")["host"] == "test-host"
    finally:
        srv.stop()
    assert not os.path.exists(sock_path)  # stop removes it


def test_calls_typed_errors_and_admin_methods(server, sock_path, sqlite_db):
    client = AdminClient(sock_path)
    status = client.call("status")
    assert {t["name"] for t in status["periodic_tasks"]} >= {"heartbeat", "power_sync"}
    assert "p99_s" in status["hub_lag"]
    missing = str(uuid.uuid4())
    with pytest.raises(RemoteError) as err:
        client.call("get_instance_info", {"instance_uuid": missing})
    assert err.value.type == "InstanceNotFound" and missing in err.value.message
    with pytest.raises(RemoteError) as err:
        client.call("get_instance_info", {"instance_uuid": "nope"})
    assert err.value.type == "InvalidInput"
    # The full summary, not RPC's short one.
    assert "unknown_domains" in client.call("sync_power_states")


@pytest.mark.parametrize(
    "line, says",
    [
        (b"{not json\n", "not JSON"),
        (b"[1, 2]\n", "must be a JSON object"),
        (b'"ping"\n', "must be a JSON object"),
        (b"\xff\xfe\n", "not UTF-8"),
        (b'{"method": 3}\n', "needs a method"),
        (b'{"method": "ping", "args": [1]}\n', "args must be an object"),
        (b'{"method": "ping", "extra": 1}\n', "unknown field(s) extra"),
        (b'{"method": "explode"}\n', "unknown method 'explode'"),
        (b'{"method": "ping", "args": {"x": 1}}\n', "unknown argument(s) x"),
        (b"[" * 100_000 + b"\n", "nested too deeply"),
    ],
)
def test_bad_lines_get_invalid_input_and_the_connection_goes_on(server, sock_path, line, says):
    replies = raw(sock_path, line, protocol.request("ping"))
    assert len(replies) == 2
    assert replies[0]["ok"] is False and replies[0]["error"]["type"] == "InvalidInput"
    assert says in replies[0]["error"]["message"]
    assert replies[1] == {
        "ok": True,
        "result": {"host": "test-host", "version": replies[1]["result"]["version"]},
    }


def test_an_oversized_line_is_refused_and_the_server_keeps_serving(server, sock_path):
    huge = b'{"method": "ping", "args": {"x": "' + b"a" * protocol.MAX_REQUEST_BYTES + b'"}}\n'
    replies = raw(sock_path, huge, protocol.request("ping"))
    # The rest of the line cannot be trusted, so the connection ends there.
    assert len(replies) == 1
    assert replies[0]["error"]["type"] == "InvalidInput"
    assert "longer than" in replies[0]["error"]["message"]
    assert AdminClient(sock_path).call("ping")["host"] == "test-host"


def test_blank_lines_are_ignored(server, sock_path):
    assert raw(sock_path, b"\n  \n", protocol.request("ping"))[0]["ok"] is True


def test_an_unexpected_error_is_a_reply_and_a_log_line(
    server, sock_path, agent, monkeypatch, caplog
):
    def boom():
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(agent.manager, "list_instances", boom)
    with caplog.at_level(logging.ERROR), pytest.raises(RemoteError) as err:
        AdminClient(sock_path).call("list_instances")
    assert (err.value.type, err.value.message) == ("RuntimeError", "disk on fire")
    assert "admin request list_instances failed" in caplog.text
    assert AdminClient(sock_path).call("ping")["host"] == "test-host"


def test_concurrent_clients_and_a_slow_call_blocks_no_one(server, sock_path, agent, monkeypatch):
    def slow():
        green.sleep(2.0)
        return []

    monkeypatch.setattr(agent.manager, "list_instances", slow)
    slow_call = green.spawn(AdminClient(sock_path).call, "list_instances")
    green.sleep(0.05)
    results = [green.spawn(AdminClient(sock_path).call, "ping") for _ in range(20)]
    assert all(gt.wait()["host"] == "test-host" for gt in results)
    assert not slow_call.dead  # every ping was answered while the slow call went on
    assert slow_call.wait() == []


def test_a_full_sync_reports_progress(server, sock_path, agent, sqlite_db):
    driver = agent.manager.driver
    driver.method_latency["get_info"] = 0.05
    for i in range(8):
        uid = str(uuid.uuid4())
        create_instance(sqlite_db, host="test-host", uuid=uid, name=f"vm{i}")
        driver.add_domain(f"vm{i}", uid, PowerState.RUNNING)
    seen = []
    summary = AdminClient(sock_path).call(
        "sync_power_states", on_progress=lambda d, t: seen.append((d, t))
    )
    assert summary["checked"] == 8
    assert len(seen) >= 3, seen
    assert seen[-1] == (8, 8)
    dones = [done for done, total in seen]
    assert dones == sorted(dones) and {total for done, total in seen} == {8}
    # One instance: no progress lines.
    seen.clear()
    one = AdminClient(sock_path).call(
        "sync_power_states", {"instance_uuid": uid}, on_progress=lambda d, t: seen.append(d)
    )
    assert one["checked"] == 1 and seen == []


def test_a_stale_socket_file_is_replaced(agent, sock_path):
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(sock_path)
    dead.close()  # the file stays, nobody listens: a killed agent's socket
    with pytest.raises(AgentUnreachable, match="nothing listens"):
        AdminClient(sock_path).call("ping")
    srv = AdminSocketServer(sock_path, agent)
    srv.start()
    try:
        assert AdminClient(sock_path).call("ping")["host"] == "test-host"
    finally:
        srv.stop()


def test_a_second_server_refuses_and_the_first_keeps_serving(server, agent, sock_path):
    second = AdminSocketServer(sock_path, agent)
    with pytest.raises(AdminSocketError, match="another compute-agent is already listening"):
        second.listen()
    second.stop()  # as the service would; must not remove the first one's socket
    assert AdminClient(sock_path).call("ping")["host"] == "test-host"


def test_a_file_that_is_not_a_socket_is_left_alone(agent, sock_path):
    with open(sock_path, "w") as f:
        f.write("precious")
    with pytest.raises(AdminSocketError, match="is not a socket"):
        AdminSocketServer(sock_path, agent).listen()
    with open(sock_path) as f:
        assert f.read() == "precious"


def test_stop_leaves_a_socket_that_is_no_longer_ours(agent, sock_path):
    srv = AdminSocketServer(sock_path, agent)
    srv.start()
    os.unlink(sock_path)
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    other.bind(sock_path)
    try:
        srv.stop()
        assert os.path.exists(sock_path)
    finally:
        other.close()


def test_stop_waits_for_a_request_in_flight_then_closes(agent, sock_path, monkeypatch):
    def slow():
        green.sleep(0.2)
        return ["done"]

    monkeypatch.setattr(agent.manager, "list_instances", slow)
    srv = AdminSocketServer(sock_path, agent, grace=2.0)
    srv.start()
    call = green.spawn(AdminClient(sock_path).call, "list_instances")
    green.sleep(0.05)
    srv.stop()
    assert call.wait() == ["done"]
    with pytest.raises(AgentUnreachable, match="does not exist"):
        AdminClient(sock_path).call("ping")


def test_client_reports_an_agent_that_hangs_up(sock_path):
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(sock_path)
    listener.listen(1)

    def hang_up():
        conn, _ = listener.accept()
        conn.recv(1024)
        conn.close()

    gt = green.spawn(hang_up)
    try:
        with pytest.raises(ClientError, match="closed the connection before replying"):
            AdminClient(sock_path).call("ping")
    finally:
        gt.wait()
        listener.close()


def test_client_reports_a_reply_that_is_not_the_protocol(sock_path):
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(sock_path)
    listener.listen(1)

    def babble():
        conn, _ = listener.accept()
        conn.recv(1024)
        conn.sendall(b'{"hello": "world"}\n')
        conn.close()

    gt = green.spawn(babble)
    try:
        with pytest.raises(ClientError, match="not a result, error or progress"):
            AdminClient(sock_path).call("ping")
    finally:
        gt.wait()
        listener.close()


def test_client_gives_up_on_a_slow_reply(server, sock_path, agent, monkeypatch):
    monkeypatch.setattr(agent.manager, "list_instances", lambda: green.sleep(1) or [])
    with pytest.raises(AgentTimeout, match=r"no answer from the agent on .* after 0\.\d s"):
        AdminClient(sock_path, timeout=0.1).call("list_instances")


def test_stop_ends_the_accepting_task(agent, sock_path):
    # Under threads a task blocked in accept() never saw the cancel nor the close.
    srv = AdminSocketServer(sock_path, agent, grace=0.5)
    srv.start()
    assert AdminClient(sock_path).call("ping")["host"] == "test-host"
    spares = server_module.SPARE_ACCEPTERS
    # Back in accept(), a successor started if need be.
    assert wait_until(lambda: srv.statistics().accepting == spares), srv.statistics()
    accepters = list(srv._waiting)
    assert len(accepters) == spares
    srv.stop()
    deadline = green.monotonic() + 2
    while not all(a.done() for a in accepters) and green.monotonic() < deadline:
        green.sleep(0.01)
    assert all(a.done() for a in accepters)


# A pure-Python thread never gives the GIL back by itself: each time a ping's
# path hands the GIL over (a system call, a new thread's start), the path waits
# a whole switch interval to get it back, as it waits behind the busy threads
# of a loaded agent (docs/benchmarks.md, "Both concurrency backends").
GIL_INTERVAL = 0.05
PINGER = """
import json, socket, sys, time
took = []
for _ in range(int(sys.argv[2])):
    t0 = time.perf_counter()
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(sys.argv[1])
        s.sendall(b'{"method": "ping", "args": {}}\\n')
        s.makefile("rb").readline()
    took.append(time.perf_counter() - t0)
    time.sleep(0.02)
print(json.dumps(took))
"""


@pytest.mark.skipif(
    green.BACKEND != "threads", reason="under eventlet the hub serves the socket: no GIL hand-over"
)
def test_a_ping_waits_for_the_gil_at_most_twice_behind_a_busy_thread(server, sock_path):
    """Its accept and its read; a thread per connection with socket timeouts
    (settimeout, then a poll before each read and each write) made it wait
    five or six times: 3 intervals and more, where this bound is 2.5."""
    stop = threading.Event()

    def spin():
        count = 0
        while not stop.is_set():
            count += 1

    before = sys.getswitchinterval()
    sys.setswitchinterval(GIL_INTERVAL)
    busy = threading.Thread(target=spin, daemon=True)
    busy.start()
    try:
        printed = subprocess.run(
            [sys.executable, "-c", PINGER, sock_path, "7"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
    finally:
        stop.set()
        busy.join()
        sys.setswitchinterval(before)
    took = json.loads(printed)
    assert statistics.median(took) < 2.5 * GIL_INTERVAL, [round(t, 3) for t in took]
