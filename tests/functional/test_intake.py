"""Bounded intake: a real agent (fake driver, SQLite, RabbitMQ) flooded while pinged.

Each test floods one front door and then reads the agent's own figures:
the hub-lag monitor (every 10 ms) and the heartbeat's lateness. Before the
intake was bounded, 5000 + 500 casts stalled the hub for 5 to 28 s, the
heartbeat 4 to 27 s, and logged 5000 WARNINGs; with intake bounded, the
hub's worst stretch measured 11-98 ms, what is left being the hub's thread
waiting for a CPU of the loaded machine (the lag lines say so). The bounds
are well above the 50 ms goal, so that a loaded CI machine passes.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator

import pytest

from tests import load
from tests.functional.rabbit import TRANSPORT_URL, RabbitRun

HUB_LAG_BOUND = 0.25
HEARTBEAT_BOUND = 0.5
SERVE_TIMEOUT = 120


@pytest.fixture
def run() -> Iterator[RabbitRun]:
    rabbit = RabbitRun()
    yield rabbit
    rabbit.cleanup()


@pytest.fixture
def agent(run: RabbitRun, tmp_path) -> Iterator[load.AgentUnderTest]:
    proc = load.AgentUnderTest(
        run.host("intake"), run.exchange, TRANSPORT_URL, state_path=str(tmp_path)
    )
    try:
        proc.wait_for("RPC serving")
        yield proc
    finally:
        proc.stop()


def _assert_hub_kept_its_budget(agent: load.AgentUnderTest, pings: load.Latencies) -> None:
    figures = load.agent_figures(agent.socket, timeout=10)
    assert figures["hub_lag_max_s"] < HUB_LAG_BOUND, (figures, agent.lines[-20:])
    assert figures["heartbeat_max_lateness_s"] < HEARTBEAT_BOUND, figures
    assert pings.failures == 0, pings.first_error
    assert len(pings.values) > 50 and pings.percentile(0.99) < HUB_LAG_BOUND * 2, pings.summary()
    assert agent.client(5.0).call("ping")["host"] == agent.host


def _served(agent: load.AgentUnderTest, requests: int, builds: int) -> bool:
    figures = load.agent_figures(agent.socket, timeout=10)
    b = figures["builds"]
    return figures["intake"]["done"] >= requests and b["completed"] >= builds


def test_a_flood_of_refused_casts_then_builds(run: RabbitRun, agent: load.AgentUnderTest):
    stops, builds = 2000, 200
    client, transport = load.rpc_client(run.conf(), agent.host)
    pinger = load.Pinger(agent.socket).start()
    try:
        load.send_casts(client, "stop_instance", load.stop_payloads(stops))
        load.send_casts(client, "build_instance", load.build_payloads(builds))
        # status answers while the flood is served.
        assert agent.client(5.0).call("status")["intake"]["slots"] == 64
        load.wait_until(lambda: _served(agent, stops + builds, builds), SERVE_TIMEOUT, 0.5)
    finally:
        pings = pinger.stop()
        transport.cleanup()
    _assert_hub_kept_its_budget(agent, pings)
    assert load.agent_figures(agent.socket)["builds"]["failed"] == 0
    # Stopping flushes the summary of the last window: every refusal is accounted for.
    assert agent.stop() == 0
    refused = [line for line in agent.lines if "refused" in line]
    assert len(refused) <= 2 + SERVE_TIMEOUT // 10, refused
    first = [line for line in refused if "RPC cast stop_instance refused: InstanceNotFound" in line]
    more = [
        int(m.group(1))
        for line in refused
        if (m := re.search(r"refused (\d+) more casts of stop_instance", line))
    ]
    assert len(first) + sum(more) == stops, refused


def test_a_flood_of_build_casts(run: RabbitRun, agent: load.AgentUnderTest):
    builds = 500
    client, transport = load.rpc_client(run.conf(), agent.host)
    pinger = load.Pinger(agent.socket).start()
    try:
        load.send_casts(client, "build_instance", load.build_payloads(builds))
        load.wait_until(lambda: _served(agent, builds, builds), SERVE_TIMEOUT, 0.5)
    finally:
        pings = pinger.stop()
        transport.cleanup()
    _assert_hub_kept_its_budget(agent, pings)
    figures = load.agent_figures(agent.socket)
    assert figures["builds"] == {"queued": 0, "running": 0, "completed": builds, "failed": 0}


def test_a_flood_of_admin_boots(agent: load.AgentUnderTest):
    boots = 600
    pinger = load.Pinger(agent.socket).start()
    started = time.monotonic()
    try:
        done = load.admin_boots(agent.socket, boots, concurrency=16)
    finally:
        pings = pinger.stop()
    assert done["ok"] == boots, done
    assert time.monotonic() - started < SERVE_TIMEOUT
    _assert_hub_kept_its_budget(agent, pings)
    assert load.agent_figures(agent.socket)["intake"]["done"] == boots
