"""``python -m bench [name ...]``: run the named benchmarks (default: all); ``--list``: which."""

import ast
import pathlib
import sys

# The default run (``python -m bench``, ``make bench``), in this order.
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
# Run by name only: a comparison with another checkout (hot_paths), drills
# that need root and a private libvirtd or minutes of attack on one agent.
ON_DEMAND = ["hot_paths", "metrics_attack", "libvirt_thaw_drill", "distant_db"]
# Modules with a main that are not benchmarks: processes other benchmarks
# start, and what they share.
HELPERS = {
    "agent_runner": "an agent process of fanout",
    "rpc_client": "the scheduler process of rpc_load",
}
HERE = pathlib.Path(__file__).resolve().parent


def summary(name: str) -> str:
    """The first line of a benchmark module's docstring, read without importing it."""
    doc = ast.get_docstring(ast.parse((HERE / f"{name}.py").read_text())) or ""
    return (doc.splitlines() or ["(no docstring)"])[0]


def listing() -> str:
    lines = [f"{n:20} {summary(n)}" for n in BENCHMARKS]
    lines += [f"{n:20} {summary(n)} [by name only]" for n in ON_DEMAND]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    """Names first; options after them (``race_soak --seconds 300``) go to the one benchmark."""
    if argv == ["--list"]:
        print(listing())
        return 0
    # Options (``--x``) after a single name go to that benchmark's main(argv).
    options = [a for i, a in enumerate(argv) if any(b.startswith("-") for b in argv[: i + 1])]
    names = argv[: len(argv) - len(options)] or BENCHMARKS
    if options and len(names) != 1:
        print("options are for one benchmark: python -m bench NAME --option ...", file=sys.stderr)
        return 2
    known = BENCHMARKS + ON_DEMAND
    unknown = [n for n in names if n not in known]
    if unknown:
        print(
            f"unknown benchmark(s): {', '.join(unknown)}; see python -m bench --list",
            file=sys.stderr,
        )
        return 2
    # Patched only to run: --list and a usage error load nothing of the agent.
    from compute_agent import green

    green.monkey_patch()
    import importlib
    import logging

    logging.basicConfig(level=logging.ERROR)
    for name in names:
        print(f"\n## {name}\n", flush=True)
        module = importlib.import_module(f"bench.{name}")
        module.main(options) if options else module.main()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
