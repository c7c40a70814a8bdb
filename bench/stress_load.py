"""The load generators of ``bench.stress``, kept apart so they can merge with ``bench/flood.py``.

Four pieces, each small and independent of the scenarios:

* :func:`run_pinger` (``python -m bench.stress_load ping SOCKET``): a plain
  process (no eventlet) that pings the admin socket every 20 ms until its
  stdin closes, then prints one JSON line of round-trip figures. Its own
  process, so the benchmark's load never delays the pings it measures.
* :func:`cast_flood`: RPC casts sent by a few greenthreads of the caller.
* :func:`admin_calls`: admin-socket calls from concurrent clients.
* :class:`FrozenProxy`: a TCP proxy that forwards until frozen, then
  accepts and forwards nothing (a database that stops answering).
"""

from __future__ import annotations

import json
import math
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

PING_INTERVAL = 0.02
PING_TIMEOUT = 120.0
PING_REQUEST = b'{"method":"ping","args":{}}\n'


# -- the pinger (plain Python: runs in a process of its own) ---------------


def _ping_once(path: str) -> float:
    """One admin-socket ping round trip, in seconds; raises OSError on failure."""
    t0 = time.perf_counter()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(PING_TIMEOUT)
        sock.connect(path)
        sock.sendall(PING_REQUEST)
        reply = sock.makefile("rb").readline()
    if not reply.startswith(b'{"ok":true'):
        raise OSError(f"unexpected reply {reply[:80]!r}")
    return time.perf_counter() - t0


def _percentile(ordered: list[float], q: float) -> float:
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def ping_figures(latencies: list[float], errors: int) -> dict[str, Any]:
    ordered = sorted(latencies)
    return {
        "pings": len(ordered),
        "errors": errors,
        "p50_s": round(_percentile(ordered, 0.50), 4),
        "p99_s": round(_percentile(ordered, 0.99), 4),
        "max_s": round(ordered[-1], 4) if ordered else None,
    }


def run_pinger(path: str, interval: float = PING_INTERVAL) -> dict[str, Any]:
    """Ping every ``interval`` s (a ping that runs late delays the next) until stdin closes."""
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    latencies: list[float] = []
    errors = 0
    due = time.monotonic()
    while not stop.is_set():
        try:
            latencies.append(_ping_once(path))
        except OSError:
            errors += 1
        due = max(due + interval, time.monotonic())
        stop.wait(max(0.0, due - time.monotonic()))
    return ping_figures(latencies, errors)


# -- senders (green: run in the benchmark's monkey-patched process) ---------


def _spread(items: list[Any], workers: int, fn: Callable[[Any], None]) -> tuple[int, list[str]]:
    """Run ``fn`` on every item from ``workers`` greenthreads; (done, first errors)."""
    from compute_agent import green

    done = [0]
    errors: list[str] = []
    pending = iter(items)

    def worker() -> None:
        for item in pending:
            try:
                fn(item)
                done[0] += 1
            except Exception as exc:  # noqa: BLE001 - counted and reported
                if len(errors) < 5:
                    errors.append(f"{type(exc).__name__}: {exc}"[:200])

    threads = [green.spawn(worker, name="stress-sender") for _ in range(workers)]
    for gt in threads:
        gt.wait()
    return done[0], errors


def cast_flood(
    api: Any, host: str, casts: Iterable[tuple[str, dict[str, Any]]], workers: int = 8
) -> tuple[int, list[str]]:
    """Send each ``(method, kwargs)`` as an RPC cast to ``host``; (sent, first errors)."""
    return _spread(list(casts), workers, lambda c: api.cast(host, c[0], **c[1]))


def admin_calls(
    path: str, calls: Iterable[tuple[str, dict[str, Any]]], clients: int = 20
) -> tuple[int, list[str]]:
    """Make each ``(method, args)`` call on the admin socket from ``clients`` at once."""
    from compute_agent.admin.client import AdminClient

    client = AdminClient(path, timeout=PING_TIMEOUT)
    return _spread(list(calls), clients, lambda c: client.call(c[0], c[1]))


def queue_depth(url: str, queue: str) -> int | None:
    """Messages waiting in ``queue`` on the broker (None when it cannot be read)."""
    import kombu

    try:
        with kombu.Connection(url.replace("rabbit://", "amqp://", 1), connect_timeout=5) as conn:
            return int(conn.channel().queue_declare(queue, passive=True).message_count)
    except Exception:  # noqa: BLE001 - unknown depth, not a benchmark failure
        return None


# -- a database that stops answering -----------------------------------------


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "ping":
        print("usage: python -m bench.stress_load ping SOCKET", file=sys.stderr)
        return 2
    print(json.dumps(run_pinger(argv[1])), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
