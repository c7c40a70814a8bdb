"""The scheduler's side of ``bench.rpc_load``, in a process of its own.

``python -m bench.rpc_client --exchange EX --host HOST --idle N``

Plain native threads (no eventlet patching), like a non-eventlet scheduler.
It waits until the agent answers, warms up, sends ``N`` pings one after
another and says ``{"phase": "idle-done"}``; then it pings back to back
until a ``stop`` line (or the end of stdin) arrives, and prints every
sample as one JSON line: ``[start, round trip]`` in seconds, ``start`` on
CLOCK_MONOTONIC, which the agent's process reads too.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from typing import Any

WARMUP = 20


def _ping(api: Any, host: str, samples: list[list[float]], errors: list[str]) -> None:
    started = time.monotonic()
    try:
        api.ping(host, timeout=10)
    except Exception as exc:  # noqa: BLE001 - counted and reported
        errors.append(f"{type(exc).__name__}: {exc}"[:200])
        return
    samples.append([started, time.monotonic() - started])


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench.rpc_client")
    parser.add_argument("--exchange", required=True)
    parser.add_argument("--host", required=True)
    parser.add_argument("--idle", type=int, default=300)
    parser.add_argument("--url", default=None)
    args = parser.parse_args(argv)

    from bench.rpc_common import TRANSPORT_URL, build_conf
    from compute_agent.rpcapi import ComputeAPI

    conf = build_conf("bench-rpc-client", args.exchange, transport_url=args.url or TRANSPORT_URL)
    api = ComputeAPI(conf, timeout=10)
    stop = threading.Event()

    def watch_stdin() -> None:
        for line in sys.stdin:
            if line.strip() == "stop":
                break
        stop.set()

    threading.Thread(target=watch_stdin, name="stdin", daemon=True).start()
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                api.ping(args.host, timeout=2)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
        errors: list[str] = []
        for _ in range(WARMUP):
            _ping(api, args.host, [], errors)
        idle: list[list[float]] = []
        for _ in range(args.idle):
            _ping(api, args.host, idle, errors)
        print(json.dumps({"phase": "idle-done", "samples": len(idle)}), flush=True)
        load: list[list[float]] = []
        while not stop.is_set():
            _ping(api, args.host, load, errors)
        print(
            json.dumps({"phase": "done", "idle": idle, "load": load, "errors": errors}), flush=True
        )
    finally:
        api.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
