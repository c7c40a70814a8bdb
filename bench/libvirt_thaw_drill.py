"""Drill: a libvirtd frozen and thawed under libvirt's client, raw or under the agent.

``python -m bench.libvirt_thaw_drill agent [--cycles N] [--backends eventlet,threads]``
runs the agent drill (``tests/functional/libvirt_drill.py``): per backend,
one busy agent on a private libvirtd of 40 instances through ``--cycles``
faults, in a repeating pattern of two freezes past the keepalive (8 s),
one shorter than it (2 s), a freeze past the keepalive and a kill with a
restart; it counts deaths, reconnections, full syncs and events after each.
``--keepalive 5,3 --freeze 30`` is the agent's default keepalive and the
30 s freeze that killed it before: calls then outlive
``stuck_call_timeout`` and their connections are set aside first.

``python -m bench.libvirt_thaw_drill [--runs N] [--threads N] [--serial]``
is the raw drill that found the cause, without the agent:

libvirt-python only, no agent code: a private session libvirtd (see
``bench.metrics_attack.private_libvirtd``), libvirt's default event loop in
a thread, a connection with keepalive 1 s x 3, and ``--threads`` threads
calling ``listAllDomains`` on it in a loop. The daemon is SIGSTOPped until
the keepalive gives up (or 12 s), then SIGCONTed. Each run is a child
process, since the crash ends it; the drill counts the runs that died of a
signal, those whose stderr has GLib-CRITICAL lines (a freed main loop
being quit: memory corruption even when the run survives) and those whose
close callback never fired (the keepalive did not end the connection).

With libvirt 9.0 (Debian 12) two or more threads crash or corrupt memory in
most runs; ``--serial`` (one call at a time on the connection, as
``Host.run`` does) and ``--threads 1`` do not. See docs/reliability.md.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import threading
import time

REPO = pathlib.Path(__file__).resolve().parent.parent


def child(threads: int, serial: bool, uri: str, daemon: int) -> None:
    """One run, in its own process; exits 0 unless libvirt crashes it.

    The parent owns the daemon (pid ``daemon``), so a crash here leaks none.
    """
    import faulthandler

    import libvirt

    faulthandler.enable()
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    libvirt.virEventRegisterDefaultImpl()

    def event_loop() -> None:
        while True:
            libvirt.virEventRunDefaultImpl()

    threading.Thread(target=event_loop, daemon=True).start()
    conn = libvirt.open(uri)
    conn.setKeepAlive(1, 3)
    closed = threading.Event()
    conn.registerCloseCallback(lambda _c, _reason, _o: closed.set(), None)
    stop = threading.Event()
    one_at_a_time = threading.Lock()
    calls = [0, 0]  # answered, failed

    def caller() -> None:
        while not stop.is_set():
            try:
                if serial:
                    with one_at_a_time:
                        conn.listAllDomains(0)
                else:
                    conn.listAllDomains(0)
                calls[0] += 1
            except libvirt.libvirtError:
                calls[1] += 1
                time.sleep(0.001)

    for _ in range(threads):
        threading.Thread(target=caller, daemon=True).start()
    try:
        time.sleep(1)
        os.kill(daemon, signal.SIGSTOP)
        t0 = time.monotonic()
        closed.wait(12)
        print(f"close callback {'after' if closed.is_set() else 'not within'} "
              f"{time.monotonic() - t0:.1f} s", flush=True)  # fmt: skip
        time.sleep(0.2)
        os.kill(daemon, signal.SIGCONT)
        time.sleep(2)
        stop.set()
        print(f"calls answered {calls[0]}, failed {calls[1]}", flush=True)
    finally:
        os.kill(daemon, signal.SIGCONT)
    os._exit(0)  # threads may still be inside libvirt


PATTERN = ("freeze", "freeze", "short", "freeze", "kill")


def agent_drill(argv: list[str]) -> None:
    """The agent under faults: each backend in turn, deaths and recoveries counted."""
    import statistics

    from tests.functional.libvirt_drill import Drill

    parser = argparse.ArgumentParser(prog="python -m bench.libvirt_thaw_drill agent")
    parser.add_argument("--cycles", type=int, default=20)
    parser.add_argument("--instances", type=int, default=40)
    parser.add_argument("--freeze", type=float, default=8.0, help="seconds past the keepalive")
    parser.add_argument("--backends", default="eventlet,threads")
    parser.add_argument(
        "--keepalive", default="1,3", help="the agent's interval,count (the default 5,3)"
    )
    args = parser.parse_args(argv)
    interval, count = (int(x) for x in args.keepalive.split(","))
    for backend in args.backends.split(","):
        root = pathlib.Path(tempfile.mkdtemp(prefix=f"ca-drill-{backend}-"))
        drill = Drill(root, backend, args.instances, keepalive=(interval, count))
        cycles = []
        try:
            drill.start()
            drill.start_load()
            for n in range(args.cycles):
                kind = PATTERN[n % len(PATTERN)]
                if kind == "kill":
                    cycle = drill.kill_and_restart()
                else:
                    cycle = drill.freeze(args.freeze if kind == "freeze" else 2.0)
                cycles.append(cycle)
                print(f"{backend} cycle {n + 1}: {cycle}", flush=True)
                if not cycle.alive:
                    break
        finally:
            rc = drill.stop()
        died = sum(not c.alive for c in cycles)
        back = [c.back_s for c in cycles if c.back_s is not None]
        output = drill.agent.output if drill.agent else ""
        print(
            f"{backend}: {len(cycles)} cycles, {died} death(s), exit status {rc}; "
            f"back and synced after {len(back)} (median {statistics.median(back):.2f} s, "
            f"max {max(back):.2f} s); events after {sum(c.events_back for c in cycles)}; "
            f"lost seen on {sum(c.lost_seen for c in cycles)}; load calls ok "
            f"{sum(drill.load.ok.values())}, failed {sum(drill.load.failed.values())}, "
            f"slowest {drill.load.slowest_s:.2f} s; stuck connections set aside "
            f"{output.count('its connection is set aside')}; "
            f"Fatal Python error in log: {'Fatal Python error' in output}",
            flush=True,
        )


def main(argv: list[str] | None = None) -> None:
    if argv and argv[0] == "agent":
        agent_drill(argv[1:])
        return
    parser = argparse.ArgumentParser(prog="python -m bench.libvirt_thaw_drill")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--serial", action="store_true", help="one call at a time")
    parser.add_argument("--child", nargs=2, metavar=("URI", "PID"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.threads, args.serial, args.child[0], int(args.child[1]))
        return
    from tests.functional.libvirt_drill import private_libvirtd

    crashed = corrupted = unclosed = 0
    for run in range(1, args.runs + 1):
        daemon, uri = private_libvirtd(pathlib.Path(tempfile.mkdtemp(prefix="ca-thaw-")) / "lv")
        cmd = [sys.executable, "-m", "bench.libvirt_thaw_drill", "--child", uri, str(daemon.pid),
               "--threads", str(args.threads)] + (["--serial"] if args.serial else [])  # fmt: skip
        try:
            proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
        finally:
            daemon.send_signal(signal.SIGCONT)
            daemon.kill()
            daemon.wait(10)
        critical = "GLib-CRITICAL" in proc.stderr
        crashed += proc.returncode < 0
        corrupted += critical
        first = proc.stdout.splitlines()[:1]
        unclosed += any("not within" in line for line in first)
        print(f"run {run}: rc {proc.returncode}, GLib-CRITICAL {critical}, {first}", flush=True)
    mode = "serial" if args.serial else "parallel"
    print(f"{args.threads} thread(s), {mode}: {crashed} of {args.runs} runs died of a signal, "
          f"{corrupted} of {args.runs} printed GLib-CRITICAL, "
          f"{unclosed} of {args.runs} never saw the keepalive close")  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1:])
