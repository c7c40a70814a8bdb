"""The hub-lag monitor measures lag and names the greenthread that blocked."""

import logging

import pytest

from compute_agent import green
from compute_agent.hub_monitor import HubLagMonitor
from compute_agent.utils import percentile


@pytest.mark.hub_only("no hub to lag, no switches to trace")
def test_lag_is_measured_and_the_culprit_named(caplog):
    mon = HubLagMonitor(interval=0.02, warn_after=0.1)
    mon.start()
    try:
        green.sleep(0.1)
        with caplog.at_level(logging.WARNING):
            green.spawn(green.native_sleep, 0.3, name="naughty-task").wait()
            green.sleep(0.1)
    finally:
        mon.stop()
    fig = mon.statistics()
    assert fig.max_s >= 0.25
    assert fig.warnings >= 1
    assert fig.worst_offender == "naughty-task"
    assert "greenthread 'naughty-task' ran 0.3" in caplog.text


@pytest.mark.hub_only("no hub to lag: the monitor is idle")
def test_idle_hub_has_little_lag():
    mon = HubLagMonitor(interval=0.01, warn_after=0.1)
    mon.start()
    green.sleep(0.3)
    mon.stop()
    fig = mon.statistics()
    assert fig.samples >= 15
    assert fig.p99_s < 0.05 and fig.warnings == 0


def test_blocking_call_in_tpool_is_not_lag():
    mon = HubLagMonitor(interval=0.01, warn_after=0.1)
    mon.start()
    green.execute(green.native_sleep, 0.3)
    mon.stop()
    assert mon.statistics().max_s < 0.05


def test_percentile_nearest_rank():
    """The one percentile of the agent's figures and the benchmarks (compute_agent.utils)."""
    data = [float(i) for i in range(100, 0, -1)]  # any order
    assert percentile(data, 0.5) == 50.0
    assert percentile(data, 0.99) == 99.0
    assert percentile([], 0.99) == 0.0
    assert percentile([3.0], 0.5) == 3.0
