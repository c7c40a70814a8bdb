"""sd_notify against a real notify socket: a UNIX datagram socket the test reads."""

import os
import socket
import uuid

import pytest

from compute_agent import green
from compute_agent.sdnotify import Notifier, NotifyLoop


@pytest.fixture(params=["path", "abstract"])
def notify_socket(request, tmp_path):
    """A bound datagram socket and the NOTIFY_SOCKET value that names it."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if request.param == "path":
        name = str(tmp_path / "notify")
        sock.bind(name)
    else:
        name = f"@compute-agent-test-{uuid.uuid4().hex}"
        sock.bind("\0" + name[1:])
    sock.settimeout(5)
    yield sock, name
    sock.close()


def _drain(sock) -> list[str]:
    """Every datagram waiting, read without yielding to the hub."""
    got = []
    sock.setblocking(False)
    try:
        while True:
            got.append(sock.recv(4096).decode())
    except BlockingIOError:
        pass
    finally:
        sock.settimeout(5)
    return got


def test_ready_status_stopping_reach_the_socket(notify_socket):
    sock, name = notify_socket
    notifier = Notifier({"NOTIFY_SOCKET": name})
    assert notifier.enabled
    assert notifier.ready("host h: heartbeat 0")
    assert sock.recv(4096).decode().split("\n") == [
        "READY=1",
        "STATUS=host h: heartbeat 0",
        f"MAINPID={os.getpid()}",
    ]
    assert notifier.status("host h:\nheartbeat 1")  # one line, whatever it is given
    assert sock.recv(4096).decode() == "STATUS=host h: heartbeat 1"
    assert not notifier.status("host h: heartbeat 1")  # unchanged: not sent again
    assert notifier.stopping("host h: stopping")
    assert sock.recv(4096).decode() == "STOPPING=1\nSTATUS=host h: stopping"
    notifier.close()


def test_without_notify_socket_nothing_is_sent():
    notifier = Notifier({})
    assert not notifier.enabled and not notifier.send("READY=1")
    assert Notifier({"NOTIFY_SOCKET": "relative"}).address is None


def test_a_missing_socket_is_reported_once_and_never_raises(tmp_path, caplog):
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    assert not notifier.send("READY=1") and not notifier.send("WATCHDOG=1")
    assert len([r for r in caplog.records if "cannot notify systemd" in r.getMessage()]) == 1


@pytest.mark.parametrize(
    ("env", "interval"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),  # meant for another
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "x"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval_is_half_the_timeout(env, interval):
    assert Notifier({"NOTIFY_SOCKET": "/x", **env}).watchdog_interval == interval


@pytest.mark.hub_only("no hub to freeze")
def test_watchdog_pings_come_from_the_hub_and_stop_while_it_is_frozen(notify_socket):
    sock, name = notify_socket
    notifier = Notifier({"NOTIFY_SOCKET": name, "WATCHDOG_USEC": "200000"})  # ping every 0.1 s
    loop = NotifyLoop(notifier, lambda: "host h: running", status_interval=60)
    loop.start()
    try:
        first = sock.recv(4096).decode()
        assert first == "WATCHDOG=1"
        assert sock.recv(4096).decode() == "STATUS=host h: running"
        green.sleep(0.5)
        assert _drain(sock).count("WATCHDOG=1") >= 2  # pinging while the hub runs
        # A blocking call on the hub: 10 intervals without one switch.
        green.native_sleep(1.0)
        assert _drain(sock) == []
        green.sleep(0.5)  # switching again: the pings resume
        assert "WATCHDOG=1" in _drain(sock)
    finally:
        loop.stop()
        notifier.close()
