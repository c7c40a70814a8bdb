"""Run the unit tests in a few pytest processes at once: ``make check``'s inner loop.

The unit tests mostly wait (sockets, timers, native threads), so a few
processes on two cores finish in a fraction of one process's time.
pytest-xdist cannot do this here: its workers talk to their controller
through a native thread, which eventlet's monkey-patching (tests/conftest.py)
stalls. Files are dealt out largest first to the lightest shard (a file's
size stands in for its run time); each shard's output is printed whole when
it ends, and the exit status is the first failing shard's.

Usage: ``python tools/unit_shards.py [-j N] [pytest options]`` (files: tests/unit).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

UNIT = Path(__file__).resolve().parent.parent / "tests" / "unit"
NO_TESTS = 5  # pytest's status for a shard whose tests were all deselected


def shards(files: list[Path], count: int) -> list[list[Path]]:
    """``files`` in ``count`` groups of about equal total size, largest first."""
    groups: list[list[Path]] = [[] for _ in range(count)]
    sizes = [0] * count
    for f in sorted(files, key=lambda p: p.stat().st_size, reverse=True):
        lightest = sizes.index(min(sizes))
        groups[lightest].append(f)
        sizes[lightest] += f.stat().st_size
    return [g for g in groups if g]


def main(argv: list[str]) -> int:
    jobs = 3
    if argv[:1] == ["-j"] and len(argv) > 1 and argv[1].isdigit() and int(argv[1]) > 0:
        jobs, argv = int(argv[1]), argv[2:]
    elif argv[:1] == ["-j"]:
        print("unit_shards: -j takes a positive number", file=sys.stderr)
        return 2
    files = sorted(UNIT.glob("test_*.py"))
    started = time.monotonic()
    running = []
    for group in shards(files, jobs):
        out = tempfile.TemporaryFile(mode="w+")
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *argv]
        proc = subprocess.Popen([*cmd, *map(str, group)], stdout=out, stderr=subprocess.STDOUT)
        running.append((proc, out, group))
    status = 0
    for i, (proc, out, group) in enumerate(running, 1):
        rc = proc.wait()
        out.seek(0)
        print(f"== shard {i}/{len(running)}: {len(group)} files, exit {rc}", flush=True)
        sys.stdout.write(out.read())
        out.close()
        if rc not in (0, NO_TESTS) and status == 0:
            status = rc
    took = time.monotonic() - started
    print(f"unit_shards: {len(running)} shards in {took:.0f} s, exit {status}")
    return status


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main(sys.argv[1:]))
