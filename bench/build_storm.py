"""Build storm: 200 build requests at once, against ``[compute] max_concurrent_builds``.

The fake driver spends 0.1 s of a native thread on each of ``define`` and
``start`` (0.2 s per build, never on the hub). 200 greenthreads each call
``manager.build_instance`` at the same moment; the agent (ComputeManager in
a NodeService, lifecycle events on, no periodic sync) records each as
``queued`` and lets ``max_concurrent_builds`` of them run at once.

For each limit: completion time against the ideal (200 x 0.2 s / limit),
and the peaks sampled every 5 ms: builds running (the manager's figures),
builds queued (the manager's figures, and rows with task_state ``queued``
counted in the database every 100 ms), and native threads busy in the
driver at once. eventlet's thread pool has 20 native threads unless
EVENTLET_THREADPOOL_SIZE says otherwise (compute_agent.green does not size
it), which caps a limit of 50; that limit is also run in a subprocess with
a pool of 64.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
from typing import Any

import sqlalchemy as sa

from bench.common import (
    HOST,
    cpu_seconds,
    load_average,
    make_conf,
    make_db,
    save,
    server_database,
    table,
    uuid_for,
)
from compute_agent import green
from compute_agent.db.models import Instance
from compute_agent.manager import ComputeManager
from compute_agent.service import NodeService
from compute_agent.utils import percentile
from compute_agent.virt.fake import FakeDriver

REQUESTS = 200
STEP_S = 0.1  # native-thread latency of define and of start
LIMITS = (1, 5, 10, 50)
PG_LIMITS = (10, 50)  # PostgreSQL (a fresh database each), when a server answers
BIG_POOL = 64
SAMPLE_S = 0.005
DB_SAMPLE_S = 0.1
ROOT = pathlib.Path(__file__).resolve().parent.parent


def pool_size() -> int:
    """The size of eventlet's native thread pool in this process (eventlet's rule)."""
    return int(os.environ.get("EVENTLET_THREADPOOL_SIZE", 20))


class NativeBusy:
    """Counts the driver's native sleeps in flight: native threads busy at once."""

    def __init__(self) -> None:
        self.now = 0
        self.peak = 0
        self._lock = green.native_lock()
        self._real = green.native_sleep

    def __enter__(self) -> NativeBusy:
        real = self._real

        def counted(seconds: float) -> None:
            with self._lock:
                self.now += 1
                self.peak = max(self.peak, self.now)
            try:
                real(seconds)
            finally:
                with self._lock:
                    self.now -= 1

        green.native_sleep = counted  # FakeDriver looks it up at each call
        return self

    def __exit__(self, *exc: Any) -> None:
        green.native_sleep = self._real


def queued_rows(db: Any) -> int:
    query = sa.select(sa.func.count()).where(Instance.host == HOST, Instance.task_state == "queued")
    with db.engine.connect() as conn:
        return int(conn.execute(query).scalar_one())


def run_case(limit: int, url: str | None = None, backend: str = "sqlite") -> dict:
    conf = make_conf(
        **{
            "compute.max_concurrent_builds": limit,
            "compute.sync_power_state_interval": -1,
            "compute.stats_interval": 0,
        }
    )
    db = make_db(0, url=url)
    opened = [0]
    sa.event.listen(db.engine, "connect", lambda *_: opened.__setitem__(0, opened[0] + 1))
    driver = FakeDriver(method_latency={"define": STEP_S, "start": STEP_S})
    manager = ComputeManager(conf, db, driver)
    service = NodeService(conf, db, components=[manager])
    service.start()
    peaks = {"running": 0, "queued": 0, "queued_rows": 0}
    done = green.Event()

    def sample() -> None:
        while not done.is_set():
            builds = manager.operations.statistics()
            peaks["running"] = max(peaks["running"], builds.running)
            peaks["queued"] = max(peaks["queued"], builds.queued)
            green.sleep(SAMPLE_S)

    def sample_db() -> None:
        while not done.is_set():
            peaks["queued_rows"] = max(peaks["queued_rows"], queued_rows(db))
            green.sleep(DB_SAMPLE_S)

    durations: list[float] = []
    failures: list[str] = []

    def build(i: int) -> None:
        t0 = green.monotonic()
        try:
            manager.build_instance(
                {"uuid": uuid_for(i), "name": f"storm-{i}", "vcpus": 1, "memory_mb": 64}
            )
        except Exception as exc:  # noqa: BLE001 - counted and reported
            failures.append(f"{type(exc).__name__}: {exc}")
        durations.append(green.monotonic() - t0)

    try:
        with NativeBusy() as busy:
            samplers = [green.spawn(sample, name="sampler"), green.spawn(sample_db, name="db")]
            t0, cpu0 = green.monotonic(), cpu_seconds()
            builders = [green.spawn(build, i, name="build-request") for i in range(REQUESTS)]
            for gt in builders:
                gt.wait()
            elapsed = green.monotonic() - t0
            done.set()
            for gt in samplers:
                gt.wait()
        cpu = cpu_seconds() - cpu0
        rows = db.instance_get_all_by_host(HOST)
        settled = sum(1 for r in rows if r.vm_state == "active" and r.task_state is None)
        lag = service.lag_monitor.statistics()
    finally:
        service.stop()
    ideal = REQUESTS * 2 * STEP_S / limit
    return {
        "backend": backend,
        "limit": limit,
        "pool": pool_size(),
        "requests": REQUESTS,
        "elapsed_s": round(elapsed, 3),
        "ideal_s": round(ideal, 3),
        "ratio": round(elapsed / ideal, 2),
        "peak_running": peaks["running"],
        "peak_native_busy": busy.peak,
        "peak_queued": peaks["queued"],
        "peak_queued_rows": peaks["queued_rows"],
        "request_p50_s": round(percentile(durations, 0.5), 3),
        "request_max_s": round(max(durations), 3),
        "active_rows": settled,
        "failures": len(failures),
        "failure_examples": failures[:3],
        "driver_calls": dict(driver.calls),
        "hub_lag_max_s": lag.max_s,
        "hub_lag_p99_s": lag.p99_s,
        "hub_lag_worst": lag.worst_offender,
        "cpu_s": round(cpu, 2),
        "db_connections_opened": opened[0],
    }


def run_in_subprocess(limit: int, pool: int) -> dict:
    """``run_case`` in a fresh interpreter whose eventlet pool has ``pool`` threads
    (EVENTLET_THREADPOOL_SIZE is read when eventlet is imported)."""
    code = (
        "from compute_agent import green; green.monkey_patch()\n"
        "import json, logging; logging.basicConfig(level=logging.ERROR)\n"
        "from bench.build_storm import run_case\n"
        f"print('RESULT ' + json.dumps(run_case({limit})))\n"
    )
    env = dict(os.environ, EVENTLET_THREADPOOL_SIZE=str(pool))
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise RuntimeError(f"subprocess failed ({proc.returncode}): {proc.stderr[-2000:]}")


def main() -> dict:
    print(f"load average at the start (1/5/15 min): {load_average()}")
    results = [run_case(limit) for limit in LIMITS]
    results.append(run_in_subprocess(50, BIG_POOL))
    for limit in PG_LIMITS:
        server = server_database("postgresql")
        if server is None:
            print("PostgreSQL: not measured (no server at COMPUTE_AGENT_TEST_POSTGRESQL)")
            break
        url, drop = server
        try:
            results.append(run_case(limit, url=url, backend="postgresql"))
        finally:
            drop()
    print(
        f"{REQUESTS} builds at once; define {STEP_S:g} s + start {STEP_S:g} s in a native "
        "thread each; lifecycle events on"
    )
    print(
        table(
            [
                "database",
                "max_concurrent_builds",
                "tpool threads",
                "completion",
                "ideal",
                "ratio",
                "peak running",
                "peak native busy",
                "peak queued (figures)",
                "peak queued rows (DB)",
                "request p50 / max",
                "CPU s",
                "hub lag max",
                "DB connections opened",
                "failed",
            ],
            [
                [
                    r["backend"],
                    r["limit"],
                    r["pool"],
                    f"{r['elapsed_s']:.2f} s",
                    f"{r['ideal_s']:.2f} s",
                    f"{r['ratio']:.2f}",
                    r["peak_running"],
                    r["peak_native_busy"],
                    r["peak_queued"],
                    r["peak_queued_rows"],
                    f"{r['request_p50_s']:.2f} / {r['request_max_s']:.2f} s",
                    f"{r['cpu_s']:.1f}",
                    f"{r['hub_lag_max_s'] * 1000:.0f} ms",
                    r["db_connections_opened"],
                    r["failures"],
                ]
                for r in results
            ],
        )
    )
    capped = [r for r in results if r["limit"] > r["pool"]]
    for r in capped:
        print(
            f"\nlimit {r['limit']} with {r['pool']} pool threads ({r['backend']}): at most "
            f"{r['peak_native_busy']} driver calls ran at once; ratio {r['ratio']:.2f}"
        )
    ok = all(r["failures"] == 0 and r["active_rows"] == REQUESTS for r in results) and all(
        r["peak_running"] <= r["limit"] for r in results
    )
    print(f"\nevery build finished and no limit was exceeded: {'yes' if ok else 'NO'}")
    print(f"load average at the end (1/5/15 min): {load_average()}")
    data = {"load_average_end": load_average(), "results": results, "all_built_within_limit": ok}
    save("build_storm", data)
    return data
