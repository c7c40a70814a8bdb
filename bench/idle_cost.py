"""Idle cost: what an agent of 1000 instances spends between its scheduled tasks.

The agent (ComputeManager and NodeService, SQLite, lifecycle events on) runs
on libvirt's test driver served by the real libvirtd (``test+unix://``, a
node file of 1000 running domains) with 1000 matching rows. The power sync
and the statistics cycle run once at start-up and then not for 600 s; once
start-up has settled, a 60 s window is measured: libvirt calls (trips to
the thread pool through ``Host.run`` and the ``Host.conn`` proxy, and every
libvirt API method called, from any thread) and CPU seconds of the process.

Then the same window again, with a few out-of-band changes (suspend, then
resume, of a few domains) made through the raw connection, uncounted: each
emits an event, and the agent's sync of that one instance is counted.
"""

from __future__ import annotations

import resource
from dataclasses import asdict
from typing import Any

from bench.common import (
    LibvirtCalls,
    cpu_seconds,
    load_average,
    make_conf,
    make_db,
    name_for,
    save,
    skip_without_libvirtd,
    table,
    test_host,
)
from compute_agent import green
from compute_agent.manager import POWER_SYNC, STATS, ComputeManager
from compute_agent.service import NodeService
from compute_agent.virt.libvirt.driver import LibvirtDriver

INSTANCES = 1000
WINDOW_S = 60.0
CHANGED = 3  # domains suspended then resumed out of band: 6 events
LONG = 600  # sync and stats intervals: nothing scheduled fires in the window


def rusage_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def settle(service: NodeService, manager: ComputeManager) -> float:
    """Wait until the start-up sync and stats cycle are done; seconds waited."""
    t0 = green.monotonic()
    deadline = t0 + 60
    tasks = service.runner.tasks
    while green.monotonic() < deadline:
        done = all(tasks[n].runs >= 1 and not tasks[n].running for n in (POWER_SYNC, STATS))
        if done and (manager.events is None or not manager.events.pending):
            green.sleep(1.0)  # the tail of start-up: connection, recovery, first heartbeat
            return green.monotonic() - t0
        green.sleep(0.1)
    raise RuntimeError("start-up did not settle within 60 s")


def window(
    label: str,
    service: NodeService,
    calls: LibvirtCalls,
    changes: list[tuple[float, Any]] | None = None,
) -> dict:
    """Measure WINDOW_S seconds; ``changes``: (offset s, blocking call) made uncounted."""
    tasks = service.runner.tasks
    runs_before = {n: t.runs for n, t in tasks.items()}
    before = calls.snapshot()
    cpu0, ru0, t0 = cpu_seconds(), rusage_cpu(), green.monotonic()
    for offset, change in changes or []:
        green.sleep(max(0.0, t0 + offset - green.monotonic()))
        calls.own(change)
    green.sleep(max(0.0, t0 + WINDOW_S - green.monotonic()))
    elapsed = green.monotonic() - t0
    cpu, ru = cpu_seconds() - cpu0, rusage_cpu() - ru0
    counted = LibvirtCalls.delta(before, calls.snapshot())
    per_min = 60.0 / elapsed
    return {
        "window": label,
        "seconds": round(elapsed, 2),
        "out_of_band_changes": len(changes or []),
        "task_runs": {n: t.runs - runs_before[n] for n, t in tasks.items()},
        "trips": counted["trips"],
        "api_calls": counted["api"],
        "rpc_calls": counted["rpc"],
        "trips_per_min": round(counted["trips"] * per_min, 1),
        "rpc_per_min": round(counted["rpc"] * per_min, 1),
        "cpu_s": round(cpu, 3),
        "cpu_s_per_min": round(cpu * per_min, 3),
        "rusage_cpu_s_per_min": round(ru * per_min, 3),
        "trips_by_name": counted["trips_by_name"],
        "api_by_name": counted["api_by_name"],
    }


def main() -> dict:
    print(f"load average at the start (1/5/15 min): {load_average()}")
    if (skipped := skip_without_libvirtd()) is not None:
        return skipped
    _, uri = test_host(INSTANCES)
    conf = make_conf(
        **{
            "libvirt.connection_uri": uri,
            "compute.handle_lifecycle_events": True,
            "compute.sync_power_state_interval": LONG,
            "compute.stats_interval": LONG,
        }
    )
    db = make_db(INSTANCES)
    calls = LibvirtCalls().install()
    try:
        manager = ComputeManager(conf, db, LibvirtDriver(conf))
        service = NodeService(conf, db, components=[manager])
        startup_cpu0 = cpu_seconds()
        before_start = calls.snapshot()
        service.start()
        try:
            settled_s = settle(service, manager)
            startup = LibvirtCalls.delta(before_start, calls.snapshot())
            startup_cpu = cpu_seconds() - startup_cpu0
            idle = window("idle", service, calls)
            raw = calls.raw_connection(manager.driver.host)
            changes: list[tuple[float, Any]] = []
            for i in range(CHANGED):
                name = name_for(i * 100)
                changes.append((5.0 + 10 * i, lambda n=name: raw.lookupByName(n).suspend()))
                changes.append((10.0 + 10 * i, lambda n=name: raw.lookupByName(n).resume()))
            busy = window(f"{2 * CHANGED} out-of-band changes", service, calls, changes)
            figures = asdict(manager.events.statistics()) if manager.events else {}
        finally:
            service.stop()
    finally:
        calls.uninstall()
    rows = [
        [
            w["window"],
            f"{w['seconds']:.0f} s",
            w["trips"],
            w["rpc_calls"],
            w["api_calls"],
            f"{w['cpu_s_per_min']:.3f} s",
            f"{w['rusage_cpu_s_per_min']:.3f} s",
        ]
        for w in (idle, busy)
    ]
    print(
        f"{INSTANCES} instances on test+unix:// (libvirtd), events on, sync and stats every "
        f"{LONG} s; start-up (first sync + stats cycle) settled in {settled_s:.1f} s with "
        f"{startup['trips']} trips, {startup['rpc']} RPC calls, {startup_cpu:.2f} CPU s"
    )
    print(
        table(
            [
                "window",
                "length",
                "libvirt trips (Host.run + proxy)",
                "libvirt RPC calls",
                "libvirt API calls (incl. local getters)",
                "CPU s/min (process_time)",
                "CPU s/min (getrusage)",
            ],
            rows,
        )
    )
    print(f"\nevent handler: {figures}")
    print(f"calls in the busy window: {busy['trips_by_name']} {busy['api_by_name']}")
    ok = idle["trips"] == 0 and idle["api_calls"] == 0
    print(
        f"\ngoal (zero libvirt calls outside scheduled tasks and events): "
        f"{'met' if ok else 'NOT met: ' + str(idle['api_by_name'])}"
    )
    print(f"load average at the end (1/5/15 min): {load_average()}")
    data = {
        "load_average_end": load_average(),
        "instances": INSTANCES,
        "settled_s": round(settled_s, 2),
        "startup_calls": startup,
        "startup_cpu_s": round(startup_cpu, 3),
        "idle": idle,
        "with_events": busy,
        "event_figures": figures,
        "goal_met": ok,
    }
    save("idle_cost", data)
    return data
