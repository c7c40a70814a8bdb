"""The hot paths' cost, this checkout against another, interleaved in one run.

``python -m bench.hot_paths --compare REV [--runs 5]`` checks REV out into a
temporary worktree and runs the probe below alternately on it and on this
checkout, so load on the machine hits both; it prints the median and spread
of each figure and the ratio this/REV. ``python -m bench.hot_paths --probe``
runs the probe once on whatever ``compute_agent`` is importable and prints
one JSON object.

The probe, all in-process on the fake driver and SQLite (bench.common):
- the power sync of 10,000 rows, per-instance reads, all rows changed and
  none changed (seconds), and the hub's longest stall under a 1 ms ticker;
- ``LifecycleHandler.on_event`` alone: hub time per STARTED event (20,000
  events, no-op sync, garbage collector off), the cost the hub pays per
  libvirt event before any sync runs.

Written for issue 15 (the concurrency API and its locks): the code it
probes exists unchanged in name since dcb25da, so the probe runs on both.
"""

from compute_agent import green

green.monkey_patch()

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import pathlib  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

ROWS = 10_000
EVENTS = 20_000
ROOT = pathlib.Path(__file__).resolve().parents[1]


def _sync(probe: dict[str, float]) -> None:
    from bench.common import HOST, Ticker, fake_driver, make_db
    from compute_agent.locks import KeyedLocks
    from compute_agent.power_sync import PowerSync

    db = make_db(ROWS, power_state="nostate")
    sync = PowerSync(db, fake_driver(ROWS), HOST, KeyedLocks(), concurrency=4, source="get_info")
    # As the agent does after start (utils.freeze_long_lived_objects): the
    # set-up's objects are not walked by every full collection.
    gc.collect()
    gc.freeze()
    for label in ("all_changed", "none_changed"):
        ticker = Ticker(0.001).start()
        green.sleep(0.02)
        ticker.lateness.clear()
        started = green.monotonic()
        summary = sync.run()
        probe[f"sync_{label}_s"] = green.monotonic() - started
        probe[f"sync_{label}_hub_max_ms"] = max(ticker.stop(), default=0.0) * 1000
        expected = ROWS if label == "all_changed" else 0
        assert summary.changed == expected, (label, summary.changed)
    db.dispose()


def _events(probe: dict[str, float]) -> None:
    from compute_agent.lifecycle import LifecycleHandler
    from compute_agent.power_sync import SyncSummary
    from compute_agent.virt.events import LifecycleEvent, Transition

    class NoSync:  # the handler's cost alone: syncs do nothing
        def sync_one(self, *args: object, **kwargs: object) -> SyncSummary:
            return SyncSummary()

    handler = LifecycleHandler(NoSync(), stopped_delay=30, concurrency=4)
    events = [
        LifecycleEvent(f"d-{i}", f"{i:08d}-0000-0000-0000-000000000000", Transition.STARTED)
        for i in range(EVENTS)
    ]
    gc.collect()
    gc.disable()
    try:
        started = time.perf_counter()
        for event in events:
            handler.on_event(event)
        probe["on_event_us"] = (time.perf_counter() - started) / EVENTS * 1e6
    finally:
        gc.enable()
    handler.stop()
    while handler.pending:
        green.sleep(0.01)


def probe() -> dict[str, float]:
    result: dict[str, float] = {}
    _sync(result)
    _events(result)
    return result


def _run_probe(checkout: pathlib.Path) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=str(checkout))
    out = subprocess.run(
        [sys.executable, "-W", "ignore", "-m", "bench.hot_paths", "--probe"],
        cwd=checkout,
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def compare(rev: str, runs: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="hot-paths-") as tmp:
        other = pathlib.Path(tmp) / "other"
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(other), rev],
            check=True,
            capture_output=True,
        )
        try:
            # The probe itself is this checkout's, so both sides run the same one.
            (other / "bench" / "hot_paths.py").write_text(pathlib.Path(__file__).read_text())
            samples: dict[str, list[dict[str, float]]] = {"this": [], rev: []}
            for _ in range(runs):
                samples[rev].append(_run_probe(other))
                samples["this"].append(_run_probe(ROOT))
        finally:
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(other)],
                check=False,
                capture_output=True,
            )
    report: dict[str, Any] = {"rev": rev, "runs": runs, "load": os.getloadavg(), "figures": {}}
    for key in samples["this"][0]:
        mine = [s[key] for s in samples["this"]]
        theirs = [s[key] for s in samples[rev]]
        report["figures"][key] = {
            rev: [statistics.median(theirs), min(theirs), max(theirs)],
            "this": [statistics.median(mine), min(mine), max(mine)],
            "ratio": statistics.median(mine) / statistics.median(theirs),
        }
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.hot_paths", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--probe", action="store_true", help="run the probe once, print JSON")
    parser.add_argument("--compare", metavar="REV", help="interleave with a checkout of REV")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv or [])
    if args.probe:
        print(json.dumps(probe()))
        return
    report = compare(args.compare or "HEAD", max(3, args.runs))
    print(f"{'figure':28} {'REV median (min-max)':>26} {'this median (min-max)':>26} ratio")
    for key, row in report["figures"].items():
        theirs, mine = row[report["rev"]], row["this"]
        print(
            f"{key:28} {theirs[0]:10.3f} ({theirs[1]:.3f}-{theirs[2]:.3f})"
            f" {mine[0]:10.3f} ({mine[1]:.3f}-{mine[2]:.3f}) {row['ratio']:5.2f}"
        )
    print(f"load average at the end: {report['load']}")


if __name__ == "__main__":
    main(sys.argv[1:])
