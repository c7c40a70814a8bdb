"""The stress benchmark's parts in tests/load.py: what it reads from the agent, its verdict."""

from __future__ import annotations

import logging
import socket

import pytest

from compute_agent import green
from compute_agent.hub_monitor import HubLagMonitor
from tests import load
from tests.functional.frozen_proxy import FrozenProxy


def test_the_lag_warning_the_benchmark_parses_is_the_one_the_monitor_logs(caplog):
    """The hub figure comes from these lines: a changed wording must break this test."""
    monitor = HubLagMonitor(interval=0.01, warn_after=0.02)
    with caplog.at_level(logging.WARNING, logger="compute_agent.hub_monitor"):
        monitor.record(0.1234, 0.125, "rpc-stop_instance")
    [match] = list(load.LAG_LINE.finditer(caplog.text))
    assert (float(match[1]), match[2], float(match[3])) == (0.123, "rpc-stop_instance", 0.125)


def test_the_agents_own_stretch_leaves_out_the_wait_for_a_cpu(caplog):
    monitor = HubLagMonitor(interval=0.01, warn_after=0.02)
    with caplog.at_level(logging.WARNING, logger="compute_agent.hub_monitor"):
        monitor.record(0.080, 0.085, "hub", 0.002, runnable=0.060)
        monitor.record(0.030, 0.031, "rpc-ping", 0.029, runnable=0.0)
    assert "waited 0.060 s for a CPU" in caplog.text
    assert abs(load.worst_own(caplog.text) - 0.030) < 1e-9


def _run(hub: float | None, beat: float, grew: bool = True) -> dict:
    return {
        "hub_worst_s": hub,
        "hub_worst_blamed": None,
        "heartbeat_late_s": beat,
        "heartbeat_late_grew": grew,
        "ping": {"p99_s": 0.001, "max_s": 0.002},
        "work": {"served": "x"},
        "load_s": 1.0,
    }


@pytest.mark.parametrize(
    ("runs", "verdict"),
    [
        ([_run(None, 0.01), _run(0.03, 0.2), _run(0.049, 0.1)], "PASS"),
        ([_run(0.01, 0.01), _run(0.2, 0.01), _run(0.3, 0.01)], "FAIL"),  # median over 50 ms
        ([_run(None, 0.6), _run(None, 0.7), _run(None, 0.01)], "FAIL"),  # median over 0.5 s
    ],
)
def test_the_verdict_is_on_the_median_of_the_runs(runs, verdict):
    assert load.summarise("build_casts", "sqlite", runs)["verdict"] == verdict


def test_the_frozen_proxy_forwards_then_moves_nothing():
    """The proxy the stress benchmark and the deadline tests share."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)

    def echo() -> None:
        while True:
            conn, _ = server.accept()
            green.spawn(lambda c=conn: [c.sendall(d) for d in iter(lambda: c.recv(100), b"")])

    echoer = green.spawn(echo)
    proxy = FrozenProxy(*server.getsockname()).start()
    try:
        client = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
        client.sendall(b"ping")
        assert client.recv(100) == b"ping"
        proxy.freeze()
        client.settimeout(0.3)
        client.sendall(b"lost")
        with pytest.raises(TimeoutError):
            client.recv(100)
        late = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)  # still accepts
        late.settimeout(0.3)
        late.sendall(b"hello")
        with pytest.raises(TimeoutError):
            late.recv(100)
        proxy.thaw()
        client.settimeout(5)
        assert client.recv(100) == b"lost"
    finally:
        proxy.stop()
        green.kill(echoer)
        server.close()
