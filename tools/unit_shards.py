"""Run the unit tests in a few pytest processes at once: ``make check``'s inner loop.

The unit tests mostly wait (sockets, timers, native threads), so a few
processes on two cores finish in a fraction of one process's time.
pytest-xdist cannot do this here: its workers talk to their controller
through a native thread, which eventlet's monkey-patching (tests/conftest.py)
stalls. Files are dealt out heaviest first to the lightest shard: a file
weighs the seconds its tests took in the last run here (kept in
.venv/unit-durations.json; a fresh checkout starts from the committed
tools/unit-durations.json), or its size in kB when not yet timed. Each
shard's output is printed whole when it ends (without the per-test
durations this collects), and the exit status is the first failing shard's.

Usage: ``python tools/unit_shards.py [-j N] [pytest options]`` (files: tests/unit).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

UNIT = Path(__file__).resolve().parent.parent / "tests" / "unit"
NO_TESTS = 5  # pytest's status for a shard whose tests were all deselected
TIMINGS = UNIT.parent.parent / ".venv" / "unit-durations.json"
SEED = Path(__file__).resolve().parent / "unit-durations.json"
DURATION = re.compile(r"^([\d.]+)s (?:call|setup|teardown)\s+(tests/unit/[^:]+\.py)::")
DURATIONS_HEADER = re.compile(r"^=+ (slowest|\d+ durations)|^\(\d+ durations < ")


def shards(files: list[Path], count: int, weights: dict[str, float]) -> list[list[Path]]:
    """``files`` in ``count`` groups of about equal total weight, heaviest first."""

    def weight(f: Path) -> float:
        return weights.get(f"tests/unit/{f.name}", f.stat().st_size / 1000)

    groups: list[list[Path]] = [[] for _ in range(count)]
    loads = [0.0] * count
    for f in sorted(files, key=weight, reverse=True):
        lightest = loads.index(min(loads))
        groups[lightest].append(f)
        loads[lightest] += weight(f)
    return [g for g in groups if g]


def _timings() -> dict[str, float]:
    for path in (TIMINGS, SEED):
        try:
            return {str(k): float(v) for k, v in json.loads(path.read_text()).items()}
        except (OSError, ValueError, AttributeError):
            continue
    return {}


def main(argv: list[str]) -> int:
    jobs = 4
    if argv[:1] == ["-j"] and len(argv) > 1 and argv[1].isdigit() and int(argv[1]) > 0:
        jobs, argv = int(argv[1]), argv[2:]
    elif argv[:1] == ["-j"]:
        print("unit_shards: -j takes a positive number", file=sys.stderr)
        return 2
    files = sorted(UNIT.glob("test_*.py"))
    started = time.monotonic()
    running = []
    weights = _timings()
    for group in shards(files, jobs, weights):
        out = tempfile.TemporaryFile(mode="w+")
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
        cmd += ["--durations=0", "--durations-min=0", *argv]
        proc = subprocess.Popen([*cmd, *map(str, group)], stdout=out, stderr=subprocess.STDOUT)
        running.append((proc, out, group))
    status = 0
    timed: dict[str, float] = {}
    for i, (proc, out, group) in enumerate(running, 1):
        rc = proc.wait()
        out.seek(0)
        print(f"== shard {i}/{len(running)}: {len(group)} files, exit {rc}", flush=True)
        for line in out:
            if (m := DURATION.match(line)) is not None:
                timed[m[2]] = timed.get(m[2], 0.0) + float(m[1])
            elif not DURATIONS_HEADER.match(line):
                sys.stdout.write(line)
        out.close()
        if rc not in (0, NO_TESTS) and status == 0:
            status = rc
    if timed:
        try:
            TIMINGS.write_text(json.dumps({**weights, **timed}, indent=0, sort_keys=True))
        except OSError:
            pass  # no .venv to keep them in: the next run weighs by size again
    took = time.monotonic() - started
    print(f"unit_shards: {len(running)} shards in {took:.0f} s, exit {status}")
    return status


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main(sys.argv[1:]))
