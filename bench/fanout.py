"""Fan-out: 20 agents on one machine, one RabbitMQ, one PostgreSQL database.

Each agent is a process of its own (``bench.agent_runner``) with a fake
driver of 500 running domains matching its 500 rows, so a sync is the
steady state (nothing to write). ``get_info`` blocks a native thread for
2 ms, about what a real libvirtd takes per domain (see ``libvirt_sync``);
default sync concurrency and source ``get_info``. This process is the
scheduler: ``ComputeAPI.ping_all`` to the 20 hosts, 50 rounds; then one
agent's full sync (``sync_power_states`` over RPC, which returns the
agent's own ``duration_s``) with the others idle, against all 20 syncing at
the same time; and the fan-out ping again while all 20 sync.
The database is created for the run and dropped at the end.
"""

from __future__ import annotations

import collections
import json
import os
import pathlib
import re
import statistics
import time
from collections.abc import Callable
from typing import Any

from bench.common import insert_hosts, ms, save, server_database, table
from bench.rpc_common import BenchRabbit, Child, interrupts_to_main, stop_children
from compute_agent import green
from compute_agent.db import migration
from compute_agent.db.api import Database
from compute_agent.rpcapi import ComputeAPI
from compute_agent.utils import percentile

AGENTS = 20
INSTANCES = 500
GET_INFO_LATENCY = 0.002
PING_ROUNDS = 50
WARMUP_ROUNDS = 5
SYNC_REPEATS = 3
POOL_SIZE = 2  # per agent: 20 x (2 + 2 overflow) stays under PostgreSQL's 100 connections


def _start_agents(rabbit: BenchRabbit, hosts: list[str], db_url: str) -> list[Child]:
    children = []
    for host in hosts:
        args = ["--host", host, "--db-url", db_url, "--exchange", rabbit.exchange]
        args += ["--url", rabbit.url, "--latency", str(GET_INFO_LATENCY)]
        args += ["--pool-size", str(POOL_SIZE)]
        children.append(Child("bench.agent_runner", args, host))
    return children


def _wait_ready(children: list[Child], timeout: float = 120) -> float:
    """Wait until every agent serves; the seconds it took."""
    t0 = green.monotonic()
    results: dict[str, Any] = {}

    def wait_one(child: Child) -> None:
        try:
            results[child.label] = json.loads(child.readline())
        except Exception as exc:  # noqa: BLE001 - reported below
            results[child.label] = {"error": str(exc)}

    threads = [green.spawn(wait_one, c, name=f"ready-{c.label}") for c in children]
    deadline = t0 + timeout
    while len(results) < len(children) and green.monotonic() < deadline:
        green.sleep(0.1)
    for gt in threads:
        gt.cancel()
    failed = {k: v for k, v in results.items() if "ready" not in v}
    missing = [c.label for c in children if c.label not in results]
    if failed or missing:
        raise RuntimeError(f"agents not ready: failed {failed}, no answer {missing}")
    return green.monotonic() - t0


def _ping_rounds(
    api: ComputeAPI, hosts: list[str], rounds: int, until: Callable[[], bool] | None = None
) -> dict[str, Any]:
    """``rounds`` fan-out pings one after another (or as many as fit before ``until()``)."""
    round_times: list[float] = []
    replies: list[float] = []
    failures = 0
    cpu0 = time.process_time()
    while len(round_times) < rounds if until is None else not until():
        t0 = green.monotonic()
        result = api.ping_all(hosts, timeout=10)
        round_times.append(green.monotonic() - t0)
        for reply in result.values():
            if reply.ok:
                replies.append(reply.elapsed_s)
            else:
                failures += 1
    cpu = time.process_time() - cpu0
    return {
        "rounds": len(round_times),
        "round_times_s": [round(t, 4) for t in round_times],
        "client_cpu_per_round_s": round(cpu / max(1, len(round_times)), 4),
        "round_p50_s": round(percentile(round_times, 0.50), 5),
        "round_p99_s": round(percentile(round_times, 0.99), 5),
        "round_max_s": round(max(round_times, default=0.0), 5),
        "reply_p50_s": round(percentile(replies, 0.50), 5),
        "reply_p99_s": round(percentile(replies, 0.99), 5),
        "failures": failures,
    }


def _single_pings(api: ComputeAPI, host: str, count: int) -> dict[str, Any]:
    """One host pinged ``count`` times, one at a time: the baseline of a fan-out."""
    rtts = []
    for _ in range(count):
        t0 = green.monotonic()
        api.ping(host)
        rtts.append(green.monotonic() - t0)
    return {
        "pings": count,
        "p50_s": round(percentile(rtts, 0.50), 5),
        "p99_s": round(percentile(rtts, 0.99), 5),
        "max_s": round(max(rtts), 5),
    }


_TICKS = os.sysconf("SC_CLK_TCK")


def _cpu_s(children: list[Child]) -> float:
    """CPU time (user + system) the children have used so far, from /proc."""
    total = 0
    for child in children:
        fields = pathlib.Path(f"/proc/{child.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / _TICKS


def _hub_lag(children: list[Child]) -> dict[str, Any]:
    """The agents' hub lag while serving, from the line each prints as it stops."""
    reports = []
    for child in children:
        for line in child.rest():
            try:
                report = json.loads(line)
            except ValueError:
                continue
            if "stopped" in report:
                reports.append(report)
    culprits: collections.Counter[str] = collections.Counter()
    for report in reports:
        for message in report["hub_lag_warnings"]:
            match = re.search(r"greenthread '([^']*)' ran ([0-9.]+) s", message)
            if match:
                culprits[match.group(1)] += 1
    maxima = [r["hub_lag_max_s"] for r in reports if r["hub_lag_max_s"] is not None]
    return {
        "agents_reporting": len(reports),
        "max_s": max(maxima, default=None),
        "p99_s_worst_agent": max((r["hub_lag_p99_s"] for r in reports), default=None),
        "warnings": sum(len(r["hub_lag_warnings"]) for r in reports),
        "warning_culprits": dict(culprits.most_common(5)),
        "examples": [m for r in reports for m in r["hub_lag_warnings"]][:5],
    }


def _sync(api: ComputeAPI, host: str) -> dict[str, Any]:
    summary = api.sync_power_states(host, timeout=300)
    if summary["checked"] != INSTANCES or summary["errors"]:
        raise RuntimeError(f"unexpected sync of {host}: {summary}")
    return summary


def _sync_all(api: ComputeAPI, hosts: list[str]) -> tuple[list[float], float]:
    """Every host syncs at once: each agent's own duration, and the wall time of all."""
    t0 = green.monotonic()
    threads = [green.spawn(_sync, api, host, name=f"sync-{host}") for host in hosts]
    durations = [gt.wait()["duration_s"] for gt in threads]
    return durations, green.monotonic() - t0


def main() -> dict:
    with interrupts_to_main():
        return _run()


def _run() -> dict:
    rabbit = BenchRabbit("fanout")
    hosts = [rabbit.host(f"host-{i:02d}") for i in range(AGENTS)]
    created = server_database("postgresql")
    if created is None:
        raise RuntimeError("no PostgreSQL server at COMPUTE_AGENT_TEST_POSTGRESQL / 127.0.0.1:5432")
    db_url, drop = created
    children: list[Child] = []
    api: ComputeAPI | None = None
    db: Database | None = None
    notes: list[str] = []
    try:
        db = Database(db_url)
        migration.upgrade(db)
        insert_hosts(db, hosts, INSTANCES)
        db.dispose()
        children = _start_agents(rabbit, hosts, db_url)
        startup_s = _wait_ready(children)
        print(f"{AGENTS} agents serving after {startup_s:.1f} s", flush=True)
        api = ComputeAPI(rabbit.client_conf(), timeout=10)

        _ping_rounds(api, hosts, WARMUP_ROUNDS)
        single = _single_pings(api, hosts[0], PING_ROUNDS)
        idle_fanout = _ping_rounds(api, hosts, PING_ROUNDS)

        cold, cold_wall = _sync_all(api, hosts)  # first sync of each agent: warm-up
        cpu0 = _cpu_s(children[:1])
        lone = [_sync(api, hosts[0])["duration_s"] for _ in range(SYNC_REPEATS)]
        lone_cpu = (_cpu_s(children[:1]) - cpu0) / SYNC_REPEATS
        together: list[list[float]] = []
        walls: list[float] = []
        cpu0 = _cpu_s(children)
        for _ in range(SYNC_REPEATS):
            durations, wall = _sync_all(api, hosts)
            together.append(durations)
            walls.append(wall)
        all_cpu = (_cpu_s(children) - cpu0) / SYNC_REPEATS / AGENTS

        # The fan-out ping once more, while all 20 agents sync.
        syncing = green.spawn(_sync_all, api, hosts, name="sync-all")
        green.sleep(0.05)
        loaded_fanout = _ping_rounds(api, hosts, 0, until=syncing.done)
        _, loaded_wall = syncing.wait()
    finally:
        if api is not None:
            api.close()
        notes += stop_children(children)
        lag = _hub_lag(children)
        notes += rabbit.cleanup()
        if db is not None:
            db.dispose()
        try:
            drop()
        except Exception as exc:  # noqa: BLE001 - reported
            notes.append(f"could not drop the database: {exc}")

    lone_s = statistics.median(lone)
    flat = [d for run in together for d in run]
    all_median = statistics.median(flat)
    all_max = max(flat)
    data = {
        "agents": AGENTS,
        "instances_per_agent": INSTANCES,
        "get_info_latency_s": GET_INFO_LATENCY,
        "agent_startup_s": round(startup_s, 2),
        "single_ping_idle": single,
        "fanout_idle": idle_fanout,
        "lone_sync_agent_cpu_s": round(lone_cpu, 3),
        "all_sync_agent_cpu_s": round(all_cpu, 3),
        "fanout_during_all_sync": dict(loaded_fanout, sync_wall_s=round(loaded_wall, 3)),
        "cold_sync_all": {"durations_s": cold, "wall_s": round(cold_wall, 3)},
        "lone_sync_s": lone,
        "all_sync_s": together,
        "all_sync_wall_s": [round(w, 3) for w in walls],
        "lone_median_s": lone_s,
        "all_median_s": all_median,
        "all_max_s": all_max,
        "slowdown_median": round(all_median / lone_s, 2),
        "slowdown_max": round(all_max / lone_s, 2),
        "agents_hub_lag": lag,
        "cleanup_notes": notes,
    }
    ping_rows = [
        [
            f"one host, one at a time ({single['pings']} pings)",
            "-",
            ms(single["p50_s"]),
            ms(single["p99_s"]),
            ms(single["max_s"]),
            "-",
            "-",
            0,
        ]
    ]
    for label, f in (
        ("ping_all, idle", idle_fanout),
        ("ping_all, while all 20 sync", loaded_fanout),
    ):
        ping_rows.append(
            [
                f"{label} ({f['rounds']} rounds)",
                f["rounds"],
                ms(f["round_p50_s"]),
                ms(f["round_p99_s"]),
                ms(f["round_max_s"]),
                ms(f["reply_p99_s"]),
                ms(f["client_cpu_per_round_s"]),
                f["failures"],
            ]
        )
    print(
        table(
            [
                "ping",
                "rounds",
                "p50",
                "p99",
                "max",
                "per-host reply p99",
                "caller CPU / round",
                "failures",
            ],
            ping_rows,
        )
    )
    print()
    print(
        table(
            [
                f"full sync of {INSTANCES} ({GET_INFO_LATENCY * 1000:.0f} ms get_info)",
                "syncs",
                "median",
                "max",
                "wall (all 20)",
                "agent CPU / sync",
                "vs lone (median / max)",
            ],
            [
                [
                    "one agent, the others idle",
                    len(lone),
                    f"{lone_s:.3f} s",
                    f"{max(lone):.3f} s",
                    "-",
                    ms(lone_cpu),
                    "1.00x",
                ],
                [
                    f"all {AGENTS} at once ({SYNC_REPEATS} runs)",
                    len(flat),
                    f"{all_median:.3f} s",
                    f"{all_max:.3f} s",
                    " / ".join(f"{w:.2f} s" for w in walls),
                    ms(all_cpu),
                    f"{all_median / lone_s:.2f}x / {all_max / lone_s:.2f}x",
                ],
                [
                    f"all {AGENTS} at once, first (cold) sync",
                    len(cold),
                    f"{statistics.median(cold):.3f} s",
                    f"{max(cold):.3f} s",
                    f"{cold_wall:.2f} s",
                    "-",
                    "-",
                ],
            ],
        )
    )
    print(
        f"\nagents' hub lag while serving: max {lag['max_s']} s, worst agent p99 "
        f"{lag['p99_s_worst_agent']} s, {lag['warnings']} warnings "
        f"(longest-running greenthreads named: {lag['warning_culprits'] or 'none'})"
    )
    if notes:
        print("clean-up:", "; ".join(notes))
    save("fanout", data)
    return data
