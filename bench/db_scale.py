"""A million dead rows beside a thousand live ones: the hot paths, and the purge.

Two agents in-process, each on its own database (fake driver: 1,000
running domains of the live instances and 20 leftover domains of deleted
ones, reaper action ``noop``), alike but for ``--dead`` soft-deleted
instances of this host and ``--actions`` audit rows of theirs in the
second (bulk INSERT ... SELECT, then ANALYZE). Each serves, through its
request table as the admin socket does, ``--runs`` times, the two agents
taking turns call by call: a full power sync, a reaper run, ``status``,
``instances list`` and one instance's audit trail. Then the purge:
the CLI's (batches of 1,000, archive fsynced) and the agent's retention
task (batches of 100, 50 ms pause) each for ``--window`` seconds, their
rate in rows a second, and how late a 10 ms ticker woke on the hub while
the agent purged.

    .venv/bin/python -m bench db_scale --dead 1000000 --actions 10000000
    .venv/bin/python -m bench db_scale --dead 100000 --actions 1000000 --backends sqlite
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
import uuid as uuidlib
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa

from bench.common import (
    HOST,
    Ticker,
    fake_driver,
    load_average,
    make_conf,
    make_db,
    save,
    server_database,
    table,
)
from compute_agent import green
from compute_agent.db import purge
from compute_agent.db.api import Database
from compute_agent.dispatch import Dispatcher
from compute_agent.manager import ComputeManager
from compute_agent.retention import Retention
from compute_agent.service import NodeService
from compute_agent.states import ActionSource, PowerState
from compute_agent.utils import freeze_long_lived_objects, percentile, utcnow
from tests.dead_rows import add_dead, dead_uuid

LIVE = 1000
LIVE_ACTIONS = 10  # audit rows per live instance
LEFTOVERS = 20  # deleted instances whose domain still runs (the reaper finds them)
PATHS = ("power sync", "reaper run", "status", "instances list", "audit trail")


def add_live_actions(db: Database) -> None:
    now = utcnow()
    rows = [
        {
            "instance_uuid": str(uuidlib.UUID(int=i + 1, version=4)),
            "action": "power_sync",
            "field": "power_state",
            "old_value": "shutdown",
            "new_value": "running",
            "reason": "bench",
            "source": "sync",
            "created_at": now,
        }
        for i in range(LIVE)
        for _ in range(LIVE_ACTIONS)
    ]
    db.actions_add(rows)


def start_agent(db: Database) -> tuple[NodeService, ComputeManager, Dispatcher]:
    conf = make_conf(
        **{
            "compute.stats_interval": 0,
            "compute.sync_power_state_interval": 0,
            "compute.running_deleted_instance_poll_interval": 0,
            "compute.running_deleted_instance_action": "noop",
        }
    )
    driver = fake_driver(LIVE)
    for i in range(1, LEFTOVERS + 1):
        driver.add_domain(f"instance-{dead_uuid(i)}", dead_uuid(i), PowerState.RUNNING)
    manager = ComputeManager(conf, db, driver)
    service = NodeService(conf, db, components=[manager])
    service.start()
    freeze_long_lived_objects()
    return service, manager, Dispatcher(manager, service)


def hot_paths(agents: dict[str, Dispatcher], runs: int) -> dict[str, dict[str, list[float]]]:
    """Each hot path ``runs`` times on each agent, as the admin socket calls it; seconds.

    The agents take turns call by call, so a change in the machine's load
    (it is shared) falls on both alike.
    """
    uuid = str(uuidlib.UUID(int=1, version=4))
    calls: dict[str, tuple[str, dict[str, Any]]] = {
        "power sync": ("sync_power_states", {}),
        "reaper run": ("reap_deleted_instances", {}),
        "status": ("status", {}),
        "instances list": ("list_instances", {}),
        "audit trail": ("get_instance_actions", {"instance_uuid": uuid, "limit": 100}),
    }
    times: dict[str, dict[str, list[float]]] = {
        f"{a}{kind}": {n: [] for n in PATHS} for a in agents for kind in ("", "_cpu")
    }
    for _ in range(runs):
        for name, (method, args) in calls.items():
            for agent, dispatcher in agents.items():
                cpu = time.process_time()
                started = time.perf_counter()
                result = dispatcher.call(method, args, ActionSource.CLI, admin=True)
                times[agent][name].append(time.perf_counter() - started)
                times[f"{agent}_cpu"][name].append(time.process_time() - cpu)
                if name == "reaper run":
                    assert result["found"] == LEFTOVERS, result
                if name == "power sync":
                    assert result["checked"] == LIVE and not result["errors"], result
    return times


def explain(db: Database, backend: str) -> dict[str, str]:
    """The plan of each hot query on the dead rows (first lines)."""
    names = ", ".join(f"'instance-{dead_uuid(i)}'" for i in range(1, 4))
    queries = {
        "live by host": f"SELECT id FROM instances WHERE host = '{HOST}' AND deleted = false",
        "reaper lookup": f"SELECT id FROM instances WHERE host = '{HOST}' AND deleted = true "
        f"AND domain_name IN ({names})",
        "trail": "SELECT id FROM instance_actions WHERE instance_uuid = 'x' ORDER BY id DESC "
        "LIMIT 100",
        "purge pick": "SELECT id FROM instances WHERE deleted = true AND deleted_at < "
        "'2030-01-01' AND id > 0 ORDER BY id LIMIT 100",
        "agent purge pick": f"SELECT id FROM instances WHERE host = '{HOST}' AND deleted = true "
        "AND deleted_at < '2030-01-01' AND id > 0 ORDER BY id LIMIT 100",
    }
    prefix = "EXPLAIN QUERY PLAN " if backend == "sqlite" else "EXPLAIN "
    plans = {}
    with db.engine.connect() as conn:
        for name, query in queries.items():
            lines = [" ".join(str(c) for c in r) for r in conn.execute(sa.text(prefix + query))]
            plans[name] = " / ".join(line.strip() for line in lines[:3])
    return plans


def purge_window(
    run: Callable[[Callable[[], bool]], purge.PurgeCounts], window: float
) -> tuple[int, float, float, float]:
    """Rows removed by ``run`` in ``window`` s, its seconds, the hub's worst and p99 lateness."""
    end = green.monotonic() + window
    ticker = Ticker().start()
    started = time.perf_counter()
    counts = run(lambda: green.monotonic() >= end)
    took = time.perf_counter() - started
    late = ticker.stop()
    return counts.rows, took, max(late, default=0.0), percentile(late, 0.99)


def _host_db(url: str | None, backend: str) -> Database:
    db = make_db(LIVE, url=url)
    add_live_actions(db)
    add_dead(db, backend, LEFTOVERS, 0)  # the reaper's finds, there in both
    return db


def _remove_sqlite(db: Database) -> None:
    """The SQLite file: gigabytes at full scale."""
    if db.url.get_backend_name() == "sqlite" and db.url.database:
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(OSError):
                os.unlink(db.url.database + suffix)


def one(
    backend: str,
    urls: tuple[str | None, str | None],
    dead: int,
    actions: int,
    runs: int,
    window: float,
) -> dict:
    """Two agents on two databases alike but for the dead rows of the second."""
    clean_db, db = _host_db(urls[0], backend), _host_db(urls[1], backend)
    print(f"  building {dead:,} dead instances, {actions:,} audit rows...", file=sys.stderr)
    built = add_dead(db, backend, dead, actions, first=LEFTOVERS + 1)
    plans = explain(db, backend)
    clean_agent, loaded_agent = start_agent(clean_db), start_agent(db)
    green.sleep(1.0)  # the start-up syncs and reaper runs first
    try:
        times = hot_paths({"clean": clean_agent[2], "loaded": loaded_agent[2]}, runs)
        # The control: how late the ticker wakes with nothing purging (a shared
        # machine's load shows here as well as in the purge windows).
        _, _, idle_late, idle_p99 = purge_window(lambda stop: _idle(stop), window / 3)
        # The agent's purge first (its batches go through the hub), then the CLI's.
        retention = Retention(db, HOST, deleted_after_days=30)
        agent_rows, agent_s, agent_late, agent_p99 = purge_window(
            lambda stop: _retention_run(retention, stop), window
        )
        archive_path = os.path.join(tempfile.mkdtemp(prefix="ca-bench-"), "archive.jsonl")
        archive = purge.Archive(archive_path)
        cli = purge.Purger(db, batch=1000, archive=archive)
        cli_rows, cli_s, cli_late, cli_p99 = purge_window(
            lambda stop: _with_stop(cli, stop).purge_deleted(utcnow()), window
        )
        archive.close()
        os.unlink(archive_path)
    finally:
        for service, _, _ in (clean_agent, loaded_agent):
            service.request_stop("bench")
            service.stop()
        _remove_sqlite(clean_db)
        _remove_sqlite(db)
    return {
        "backend": backend,
        "dead": dead,
        "actions": actions,
        "build_s": built,
        "clean_s": times["clean"],
        "loaded_s": times["loaded"],
        # CPU of this process (the agent; SQLite's work too, not a server's):
        # what the dead rows cost, whatever else the shared machine runs.
        "clean_cpu_s": times["clean_cpu"],
        "loaded_cpu_s": times["loaded_cpu"],
        "plans": plans,
        "cli_purge": {
            "rows": cli_rows,
            "seconds": cli_s,
            "hub_max_late_s": cli_late,
            "hub_p99_late_s": cli_p99,
        },
        "agent_purge": {
            "rows": agent_rows,
            "seconds": agent_s,
            "hub_max_late_s": agent_late,
            "hub_p99_late_s": agent_p99,
        },
        "idle_hub_max_late_s": idle_late,
        "idle_hub_p99_late_s": idle_p99,
    }


def _idle(stop: Callable[[], bool]) -> purge.PurgeCounts:
    while not stop():
        green.sleep(0.1)
    return purge.PurgeCounts()


def _with_stop(purger: purge.Purger, stop: Callable[[], bool]) -> purge.Purger:
    purger.should_stop = stop
    return purger


def _retention_run(retention: Retention, stop: Callable[[], bool]) -> purge.PurgeCounts:
    retention.should_stop = stop
    summary = retention.run()
    return purge.PurgeCounts(summary.instances, summary.instance_actions)


def _med(values: list[float]) -> str:
    return (
        f"{statistics.median(values) * 1000:.1f} ms "
        f"({min(values) * 1000:.1f}-{max(values) * 1000:.1f})"
    )


def _report(r: dict) -> None:
    """One backend's tables, printed as soon as it is done."""
    rows, purges = [], []
    for name in PATHS:
        clean, loaded = r["clean_s"][name], r["loaded_s"][name]
        ratio = statistics.median(loaded) / statistics.median(clean)
        cpu_clean, cpu_loaded = r["clean_cpu_s"][name], r["loaded_cpu_s"][name]
        cpu_ratio = statistics.median(cpu_loaded) / max(1e-6, statistics.median(cpu_clean))
        rows.append(
            [
                r["backend"],
                name,
                _med(clean),
                _med(loaded),
                f"{ratio:.2f}x",
                _med(cpu_clean),
                _med(cpu_loaded),
                f"{cpu_ratio:.2f}x",
            ]
        )
    for who in ("agent_purge", "cli_purge"):
        p = r[who]
        purges.append(
            [
                r["backend"],
                who.replace("_purge", ""),
                f"{p['rows']:,}",
                f"{p['seconds']:.1f} s",
                f"{p['rows'] / p['seconds']:,.0f}",
                f"{p['hub_max_late_s'] * 1000:.1f} ms",
                f"{p['hub_p99_late_s'] * 1000:.1f} ms",
            ]
        )
    print(f"\n{r['backend']}: built in {r['build_s']:.0f} s; plans: {r['plans']}")
    print(f"{r['dead']:,} soft-deleted instances, {r['actions']:,} audit rows, {LIVE} live")
    headers = ["db", "path", "no dead rows", "with dead rows", "ratio"]
    headers += ["cpu, no dead rows", "cpu, with dead rows", "cpu ratio"]
    print(table(headers, rows))
    print()
    print(table(["db", "purge", "rows", "window", "rows/s", "hub max late", "p99"], purges))
    print(
        f"hub late with nothing purging: max {r['idle_hub_max_late_s'] * 1000:.1f} ms, "
        f"p99 {r['idle_hub_p99_late_s'] * 1000:.1f} ms"
    )
    print(f"load average: {load_average()}", flush=True)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench db_scale")
    parser.add_argument("--dead", type=int, default=1_000_000)
    parser.add_argument("--actions", type=int, default=10_000_000)
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--window", type=float, default=30.0, help="seconds of each purge")
    parser.add_argument("--backends", default="sqlite,postgresql")
    a = parser.parse_args(argv or [])
    results = []
    for backend in a.backends.split(","):
        urls: tuple[str | None, str | None] = (None, None)
        drops: list[Callable[[], None]] = []
        if backend == "postgresql":
            servers = [server_database(), server_database()]
            drops = [s[1] for s in servers if s is not None]
            if len(drops) < 2:
                print("postgresql: no server, skipped")
                for drop in drops:
                    drop()
                continue
            urls = (servers[0][0], servers[1][0])  # type: ignore[index]
        try:
            r = one(backend, urls, a.dead, a.actions, a.runs, a.window)
        finally:
            for drop in drops:
                drop()
        r["load"] = load_average()
        results.append(r)
        _report(r)
        save("db_scale", {"args": vars(a), "results": results})
    return {"results": results}


if __name__ == "__main__":
    main(sys.argv[1:])
