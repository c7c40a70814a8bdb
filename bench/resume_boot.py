"""Resume after a host boot: 200 guests started again, against the ideal bound.

After a simulated host boot (every domain shut off, every row still
``active``) the resume pass starts each guest through the operations' own
flow (lock, task_state, audit rows, settle). The fake driver makes each
start block a native thread for LATENCY_S, as a slow QEMU start would; the
ideal bound is N * LATENCY_S / limit (the starts alone, perfectly packed),
so the ratio to it is what the pass itself costs. SQLite; the hub's
lateness is measured by a 10 ms ticker meanwhile.
"""

from __future__ import annotations

import statistics
import tempfile
from typing import Any

from bench.common import HOST, Ticker, load_average, make_db, ms, name_for, save, table, uuid_for
from compute_agent import green
from compute_agent.locks import KeyedLocks
from compute_agent.operations import InstanceOperations
from compute_agent.resume import BootResume
from compute_agent.states import PowerState
from compute_agent.virt.fake import FakeDriver

GUESTS = 200
LATENCY_S = 0.1
LIMITS = (5, 10, 20)
RUNS = 3


def one(limit: int) -> dict[str, Any]:
    db = make_db(GUESTS, power_state="running")
    driver = FakeDriver(method_latency={"power_on": LATENCY_S})
    driver.init_host(HOST)
    for i in range(GUESTS):
        driver.add_domain(name_for(i), uuid_for(i), PowerState.SHUTDOWN)
    ops = InstanceOperations(
        db,
        driver,
        HOST,
        KeyedLocks(),
        name_template="instance-%(uuid)s",
        shutdown_timeout=0,
        max_concurrent_builds=limit,
    )
    resume = BootResume(
        db,
        driver,
        ops,
        HOST,
        enabled=True,
        state_path=tempfile.mkdtemp(prefix="ca-bench-"),
        boot_id_path="/proc/sys/kernel/random/boot_id",
        concurrency=limit,
    )
    resume.due = True  # as check_boot decides after a boot
    resume.prepare()
    ticker = Ticker().start()
    t0 = green.monotonic()
    resume.run_pass()
    elapsed = green.monotonic() - t0
    lateness = ticker.stop()
    fig = resume.statistics()
    running = sum(1 for d in driver.domains.values() if d.state is PowerState.RUNNING)
    active = sum(1 for r in db.instance_get_all_by_host(HOST) if r.power_state == "running")
    db.dispose()
    return {
        "seconds": round(elapsed, 3),
        "resumed": fig.resumed,
        "failed": fig.failed,
        "max_in_flight": fig.max_in_flight,
        "domains_running": running,
        "rows_running": active,
        "hub_max_late_s": round(max(lateness, default=0.0), 4),
    }


def main() -> dict[str, Any]:
    print(f"{GUESTS} guests, start latency {LATENCY_S} s, load {load_average()}")
    results = []
    for limit in LIMITS:
        runs = [one(limit) for _ in range(RUNS)]
        secs = [r["seconds"] for r in runs]
        bound = GUESTS * LATENCY_S / limit
        results.append(
            {
                "limit": limit,
                "runs": runs,
                "median_s": statistics.median(secs),
                "min_s": min(secs),
                "max_s": max(secs),
                "bound_s": bound,
                "ratio": round(statistics.median(secs) / bound, 2),
                "max_in_flight": max(r["max_in_flight"] for r in runs),
                "all_resumed": all(
                    r["resumed"] == r["domains_running"] == r["rows_running"] == GUESTS
                    for r in runs
                ),
                "hub_max_late_s": max(r["hub_max_late_s"] for r in runs),
            }
        )
    rows = [
        [
            r["limit"],
            f"{r['median_s']:.2f} s ({r['min_s']:.2f}-{r['max_s']:.2f})",
            f"{r['bound_s']:.2f} s",
            r["ratio"],
            r["max_in_flight"],
            "yes" if r["all_resumed"] else "NO",
            ms(r["hub_max_late_s"]),
        ]
        for r in results
    ]
    print(
        table(
            [
                "limit",
                f"resume of {GUESTS}, median of {RUNS} (min-max)",
                "ideal bound N*latency/limit",
                "ratio",
                "max in flight",
                "all 200 running, rows too",
                "hub max lateness",
            ],
            rows,
        )
    )
    bound_ok = all(r["max_in_flight"] <= r["limit"] for r in results)
    print(f"\nconcurrency bound honoured: {'yes' if bound_ok else 'NO'}")
    data = {"guests": GUESTS, "latency_s": LATENCY_S, "results": results, "bound_ok": bound_ok}
    save("resume_boot", data)
    return data
