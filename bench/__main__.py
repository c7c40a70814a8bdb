"""``python -m bench [name ...]``: run the named benchmarks (default: all)."""

from compute_agent import green

green.monkey_patch()

import importlib  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402

BENCHMARKS = [
    "responsiveness",
    "sync_throughput",
    "instance_exists",
    "libvirt_sync",
    "event_latency",
    "idle_cost",
    "build_storm",
    "stats_sampling",
    "rpc_load",
    "fanout",
    "instance_load",
    "stress",
    "race_soak",
    "resume_boot",
    "metrics_scrape",
    "reaper_flood",
    "agent_sync",
    "fleet",
    "db_scale",
    "backends",
]


def main(argv: list[str]) -> int:
    """Names first; options after them (``race_soak --seconds 300``) go to the one benchmark."""
    logging.basicConfig(level=logging.ERROR)
    # Options (``--x``) after a single name go to that benchmark's main(argv).
    options = [a for i, a in enumerate(argv) if any(b.startswith("-") for b in argv[: i + 1])]
    names = argv[: len(argv) - len(options)] or BENCHMARKS
    if options and len(names) != 1:
        print("options are for one benchmark: python -m bench NAME --option ...")
        return 2
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        print(f"unknown benchmark(s): {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}")
        return 2
    for name in names:
        print(f"\n## {name}\n", flush=True)
        module = importlib.import_module(f"bench.{name}")
        module.main(options) if options else module.main()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
