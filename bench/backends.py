"""Both concurrency backends side by side (issue 21): ``python -m bench backends``.

``python -m bench backends [--scenario NAME ...] [--runs N] [--db sqlite|postgresql]``
``python -m bench backends --inprocess sync_throughput --inprocess event_latency [--runs N]``

Each run of each stress scenario (``bench/stress.py``: the real agent under
load, a pinger on its admin socket) is made once on eventlet and once on
native threads, interleaved (the backend that goes first alternates from
run to run), so that a change in the machine's load falls on both. Only the
agent's backend changes (``COMPUTE_AGENT_CONCURRENCY`` in its environment);
the harness and the pinger stay as they are. Per scenario and backend: the
medians (min-max) of the load's duration, the agent's CPU seconds during
it, the heartbeat's lateness, the admin pings' p99 and worst, and the
threads/eventlet ratio of each median.

``--inprocess NAME``: benchmarks whose agent runs inside the benchmark's
own process (``sync_throughput``, ``event_latency``) run as ``python -m
bench NAME`` in a child on each backend, interleaved the same way; their
figures are read from ``bench/results/NAME.json``, and the child's CPU
seconds from the kernel's accounting of finished children.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

from bench import stress
from bench.common import RESULTS, load_average, save, table
from bench.rpc_common import REPO
from compute_agent.concurrency import VARIABLE

BACKENDS = ("eventlet", "threads")
# Scenarios on SQLite only, no broker: the ones whose figures each backend owns.
DEFAULT_SCENARIOS = ("admin_boots", "full_sync_10k", "status_10k")
# (label, how to read it from a run's result); every one is "lower is better".
FIGURES = (
    ("load time, s", lambda r: r["load_s"]),
    ("agent CPU during the load, s", lambda r: r["load_cpu_s"]),
    ("heartbeat late, s", lambda r: r["heartbeat_late_s"]),
    ("admin ping p99, ms", lambda r: 1000 * (r["ping"].get("p99_s") or 0)),
    ("admin ping worst, ms", lambda r: 1000 * (r["ping"].get("max_s") or 0)),
)


def run_on(backend: str, scenario: stress.Scenario, database: str) -> dict[str, Any]:
    """One stress run whose agent runs on ``backend``."""
    before = os.environ.get(VARIABLE)
    os.environ[VARIABLE] = backend
    try:
        return stress.run_once(scenario, database)
    finally:
        if before is None:
            del os.environ[VARIABLE]
        else:
            os.environ[VARIABLE] = before


def _median(values: list[float]) -> str:
    return f"{statistics.median(values):.3g} ({min(values):.3g}-{max(values):.3g})"


def rows_of(results: dict[str, dict[str, list[dict[str, Any]]]]) -> list[list[str]]:
    rows = []
    for name, by_backend in results.items():
        for label, read in FIGURES:
            values = {b: [float(read(r)) for r in by_backend[b]] for b in BACKENDS}
            medians = [statistics.median(values[b]) for b in BACKENDS]
            ratio = f"{medians[1] / medians[0]:.2f}" if medians[0] else "-"
            rows.append([name, label, *(_median(values[b]) for b in BACKENDS), ratio])
    return rows


def child_run(name: str, backend: str) -> dict[str, float]:
    """``python -m bench NAME`` on ``backend``: its figures (seconds) and its CPU seconds."""
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(
        [sys.executable, "-m", "bench", name],
        cwd=REPO,
        env=dict(os.environ, **{VARIABLE: backend}),
        stdout=subprocess.DEVNULL,
        check=True,
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - used.ru_utime) + (after.ru_stime - used.ru_stime)
    data = json.loads((RESULTS / f"{name}.json").read_text())
    return {"process CPU, s": cpu, **_figures_of(name, data)}


def _figures_of(name: str, data: dict[str, Any]) -> dict[str, float]:
    """The latency and time figures (seconds) of one in-process benchmark's results."""
    found: dict[str, float] = {}
    if name == "sync_throughput":
        for r in data["results"]:
            found[f"{r['instances']} instances, {r['source']}, {r['run']}: s"] = r["seconds"]
    elif name == "event_latency":
        for key, label in (("events_on", "events on"), ("events_off", "events off")):
            for k in data[key]["kinds"]:
                for stat in ("p50_s", "max_s"):
                    if k[stat] is not None:
                        found[f"{label}, {k['kind']}: {stat[:-2]}, s"] = k[stat]
        found["build p50, s"] = data["events_on"]["build_p50_s"]
    return found


def inprocess(names: list[str], runs: int) -> dict[str, Any]:
    results: dict[str, dict[str, list[dict[str, float]]]] = {}
    for name in names:
        results[name] = {b: [] for b in BACKENDS}
        for i in range(runs):
            for backend in BACKENDS if i % 2 == 0 else BACKENDS[::-1]:
                figures = child_run(name, backend)
                results[name][backend].append(figures)
                print(f"  {name} run {i + 1} on {backend}: {figures}", flush=True)
    rows = []
    for name, by_backend in results.items():
        for label in by_backend[BACKENDS[0]][0]:
            values = {b: [r[label] for r in by_backend[b] if label in r] for b in BACKENDS}
            if not all(values.values()):
                continue
            medians = [statistics.median(values[b]) for b in BACKENDS]
            ratio = f"{medians[1] / medians[0]:.2f}" if medians[0] else "-"
            rows.append([name, label, *(_median(values[b]) for b in BACKENDS), ratio])
    print(
        table(
            [
                "benchmark",
                "figure",
                "eventlet median (min-max)",
                "threads median (min-max)",
                "threads/eventlet",
            ],
            rows,
        )  # fmt: skip
    )
    data = {"runs": runs, "results": results}
    save("backends-inprocess", data)
    return data


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench backends")
    parser.add_argument("--scenario", choices=sorted(stress.BY_NAME), action="append")
    parser.add_argument(
        "--inprocess", choices=["sync_throughput", "event_latency"], action="append"
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--db", choices=["sqlite", "postgresql"], default="sqlite")
    args = parser.parse_args(argv or [])
    if args.inprocess:
        print(f"load average at the start (1/5/15 min): {load_average()}")
        data = inprocess(args.inprocess, args.runs)
        print(f"load average at the end (1/5/15 min): {load_average()}")
        return data
    names = args.scenario or list(DEFAULT_SCENARIOS)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    print(f"commit {commit}; load average at the start (1/5/15 min): {load_average()}")
    results: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for name in names:
        scenario = stress.BY_NAME[name]
        results[name] = {b: [] for b in BACKENDS}
        for i in range(args.runs):
            order = BACKENDS if i % 2 == 0 else BACKENDS[::-1]
            for backend in order:
                t0 = time.monotonic()
                result = run_on(backend, scenario, args.db)
                results[name][backend].append(result)
                print(
                    f"  {name} run {i + 1} on {backend}: load {result['load_s']} s, "
                    f"CPU {result['load_cpu_s']} s, heartbeat late "
                    f"{result['heartbeat_late_s']:.2f} s, ping p99 "
                    f"{1000 * (result['ping'].get('p99_s') or 0):.0f} ms; "
                    f"{time.monotonic() - t0:.0f} s in all",
                    flush=True,
                )
    rows = rows_of(results)
    print(
        table(
            [
                "scenario",
                "figure",
                "eventlet median (min-max)",
                "threads median (min-max)",
                "threads/eventlet",
            ],
            rows,
        )  # fmt: skip
    )
    print(f"load average at the end (1/5/15 min): {load_average()}")
    data = {"commit": commit, "database": args.db, "runs": args.runs, "results": results}
    save("backends", data)
    return data
