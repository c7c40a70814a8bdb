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
]


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.ERROR)
    names = argv or BENCHMARKS
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        print(f"unknown benchmark(s): {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}")
        return 2
    for name in names:
        print(f"\n## {name}\n", flush=True)
        importlib.import_module(f"bench.{name}").main()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
