"""Responsiveness under a full sync: the frozen-service failure, measured.

1000 instances, a fake driver whose get_info blocks a native thread for
20 ms, a full power-state sync running. Meanwhile the heartbeat (every 1 s)
and a greenthread that wakes every 10 ms record how late they are. The same
figures with no sync running, side by side; and, as the counter-example, a
driver that makes the same 20 ms calls on the hub, as the 2012 agent did.
"""

from __future__ import annotations

from typing import Any

from bench.common import Ticker, fake_driver, make_conf, make_db, ms, save, table
from compute_agent import green
from compute_agent.manager import POWER_SYNC, ComputeManager
from compute_agent.service import HEARTBEAT, NodeService
from compute_agent.utils import percentile

INSTANCES = 1000
LATENCY = 0.020


class HubBlockingDriver:
    """Wraps a fake driver so its latency is spent on the hub: the anti-pattern."""

    @staticmethod
    def make(count: int):
        driver = fake_driver(count, latency=0.0)
        real = driver.get_info

        def blocking_get_info(instance):
            green.native_sleep(LATENCY)  # the C call, made on the hub
            return real(instance)

        driver.get_info = blocking_get_info
        return driver


def scenario(label: str, count: int, driver: Any, run_sync: bool, idle_for: float = 0) -> dict:
    conf = make_conf(
        report_interval=1,
        **{"compute.sync_power_state_interval": -1, "compute.sync_power_state_concurrency": 4},
    )
    db = make_db(count)
    manager = ComputeManager(conf, db, driver)
    service = NodeService(conf, db, components=[manager])
    service.start()
    green.sleep(1.2)  # let start-up settle
    beat = service.runner.tasks[HEARTBEAT]
    beat.max_lateness = 0.0
    runs_before = beat.runs
    ticker = Ticker(0.010).start()
    t0 = green.monotonic()
    summary = None
    if run_sync:
        summary = service.runner.run_now(POWER_SYNC).result()
    else:
        green.sleep(idle_for)
    elapsed = green.monotonic() - t0
    late = ticker.stop()
    lag = service.lag_monitor.statistics()
    service.stop()
    return {
        "scenario": label,
        "instances": count,
        "duration_s": round(elapsed, 3),
        "sync_checked": summary.checked if summary else None,
        "heartbeats": beat.runs - runs_before,
        "heartbeat_max_late_s": round(beat.max_lateness, 4),
        "ticker_samples": len(late),
        "ticker_p50_s": round(percentile(late, 0.50), 4),
        "ticker_p99_s": round(percentile(late, 0.99), 4),
        "ticker_max_s": round(max(late) if late else 0.0, 4),
        "hub_lag_max_s": lag.max_s,
    }


def main() -> dict:
    sync = scenario(
        "full sync, 20 ms native get_info",
        INSTANCES,
        fake_driver(INSTANCES, latency=LATENCY),
        run_sync=True,
    )
    idle = scenario(
        "no sync (same duration)",
        INSTANCES,
        fake_driver(INSTANCES),
        run_sync=False,
        idle_for=sync["duration_s"],
    )
    bad = scenario(
        "counter-example: 20 ms get_info on the hub, 100 instances",
        100,
        HubBlockingDriver.make(100),
        run_sync=True,
    )
    rows = [
        [
            r["scenario"],
            r["instances"],
            f"{r['duration_s']:.2f} s",
            r["heartbeats"],
            ms(r["heartbeat_max_late_s"]),
            ms(r["ticker_p50_s"]),
            ms(r["ticker_p99_s"]),
            ms(r["ticker_max_s"]),
        ]
        for r in (sync, idle, bad)
    ]
    print(
        table(
            [
                "scenario",
                "instances",
                "duration",
                "heartbeats",
                "heartbeat max late",
                "10 ms ticker p50 late",
                "p99 late",
                "max late",
            ],
            rows,
        )
    )
    ok = sync["heartbeat_max_late_s"] <= 0.050 and sync["ticker_p99_s"] <= 0.010
    print(
        f"\ngoal (heartbeat <= 50 ms late, ticker p99 <= 10 ms during the sync): "
        f"{'met' if ok else 'NOT met'}"
    )
    data = {"sync": sync, "idle": idle, "hub_blocking": bad, "goal_met": ok}
    save("responsiveness", data)
    return data
