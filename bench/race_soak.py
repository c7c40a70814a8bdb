"""Race soak: the issue-12 race run for longer, on more guests, seed after seed.

The same engine as ``tests/functional/test_races_qemu.py``
(``tests/functional/race_model.py``): one real agent on qemu:///system in
enforce mode (sync every 5 s, ``lifecycle_event_delay`` 2 s), tiny diskless
guests, a seeded random schedule of agent operations, out-of-band libvirt
actions and forced syncs from several threads, then the invariants. With
``--runs N`` the seeds are ``seed``, ``seed + 1``, ...; each run prints one
summary line, and a failed one its full report (seed, violations, timeline,
agent log's tail). ``COMPUTE_AGENT_RACE_SEED`` sets the first seed too.

    python -m bench race_soak --seconds 300 --guests 8 --seed 42 --runs 3
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from bench.common import save, skip_without_libvirtd


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench race_soak", description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=180, help="schedule length per run")
    parser.add_argument("--seed", type=int, help="first seed (default: random)")
    parser.add_argument("--guests", type=int, default=8, help="guests (6-10 suit 2 cores)")
    parser.add_argument("--threads", type=int, default=4, help="threads acting at once")
    parser.add_argument("--runs", type=int, default=1, help="runs, on consecutive seeds")
    parser.add_argument("--db", default="sqlite", help="sqlite, postgresql or a SQLAlchemy URL")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    skipped = skip_without_libvirtd()
    if skipped:
        return skipped
    from tests.functional import race_model

    args = parse(argv or [])
    first = race_model.seed_from_env(args.seed)
    results = []
    for seed in range(first, first + args.runs):
        config = race_model.RaceConfig(
            seed=seed,
            seconds=args.seconds,
            guests=args.guests,
            threads=args.threads,
            backend=args.db,
        )
        t0 = time.monotonic()
        run = race_model.run_once(config)
        summary = dict(run.summary(), wall_s=round(time.monotonic() - t0, 1))
        results.append(summary)
        print(json.dumps({k: v for k, v in summary.items() if k != "counts"}), flush=True)
        if run.violations:
            print(run.report(), flush=True)
    failed = [r["seed"] for r in results if r["violations"]]
    clean = len(results) - len(failed)
    print(f"race soak: {clean}/{len(results)} runs clean; failed seeds {failed}")
    data = {"seconds": args.seconds, "guests": args.guests, "runs": results, "failed": failed}
    save("race_soak", data)
    return data


if __name__ == "__main__":
    from compute_agent import green

    green.monkey_patch()
    sys.exit(1 if main(sys.argv[1:])["failed"] else 0)
