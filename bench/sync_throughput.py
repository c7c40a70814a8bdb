"""Sync throughput: instances per second, SQL statements and driver calls per sync.

Zero-latency fake driver, SQLite. For each size two syncs: the first finds
every instance changed (power_state nostate -> running), the second finds
nothing to change. Statements are counted by an engine event, driver calls
by the fake driver: both counted, not guessed. What set-up made is frozen
out of the garbage collector first, as the agent freezes its start-up
(utils.freeze_long_lived_objects): otherwise one full collection of the
import-time heap (25-30 ms) lands in whichever row the allocation count
picks, a different one on each backend.
"""

from __future__ import annotations

import math

from bench.common import HOST, fake_driver, make_db, save, table
from compute_agent import green
from compute_agent.locks import KeyedLocks
from compute_agent.power_sync import WRITE_BATCH, PowerSync
from compute_agent.utils import freeze_long_lived_objects

SIZES = (100, 1000, 10_000)


def statement_budget(changed: int) -> int:
    """Every statement the server runs, BEGIN, COMMIT and each executemany row included.

    The load is the pool's check, BEGIN, one SELECT, COMMIT; each batch of
    up to WRITE_BATCH writes adds a check, BEGIN and COMMIT (one batch more
    for a write that waited WRITE_DELAY_S); each changed row is one UPDATE
    and here one audit row (only power_state changes).
    """
    batches = math.ceil(changed / WRITE_BATCH) + 1
    return 4 + 3 * batches + 2 * changed


def one(count: int, source: str) -> list[dict]:
    db = make_db(count, power_state="nostate")
    driver = fake_driver(count)
    sync = PowerSync(db, driver, HOST, KeyedLocks(), concurrency=4, source=source)
    freeze_long_lived_objects()
    results = []
    for label in ("all changed", "none changed"):
        db.statements = 0
        driver.calls.clear()
        t0 = green.monotonic()
        summary = sync.run()
        elapsed = green.monotonic() - t0
        results.append(
            {
                "instances": count,
                "source": source,
                "run": label,
                "seconds": round(elapsed, 4),
                "per_second": round(count / elapsed),
                "changed": summary.changed,
                "sql_statements": db.statements,
                "statement_budget": statement_budget(summary.changed),
                "driver_calls": sum(driver.calls.values()),
                "driver_calls_by_method": dict(driver.calls),
            }
        )
    db.dispose()
    return results


def main() -> dict:
    results = [r for count in SIZES for source in ("get_info", "bulk") for r in one(count, source)]
    rows = [
        [
            r["instances"],
            r["source"],
            r["run"],
            f"{r['seconds']:.3f} s",
            r["per_second"],
            r["changed"],
            f"{r['sql_statements']} (budget {r['statement_budget']})",
            r["driver_calls"],
        ]
        for r in results
    ]
    print(
        table(
            [
                "instances",
                "source",
                "run",
                "time",
                "instances/s",
                "changed",
                "SQL statements",
                "driver calls",
            ],
            rows,
        )
    )
    big = [r for r in results if r["instances"] == 10_000]
    time_ok = all(r["seconds"] <= 2.0 for r in big)
    sql_ok = all(r["sql_statements"] <= r["statement_budget"] for r in results)
    print(
        f"\ngoal (10,000 instances in <= 2 s): {'met' if time_ok else 'NOT met'}; "
        f"SQL statements within the budget (statement_budget): {'met' if sql_ok else 'NOT met'}"
    )
    data = {"results": results, "time_goal_met": time_ok, "sql_goal_met": sql_ok}
    save("sync_throughput", data)
    return data
