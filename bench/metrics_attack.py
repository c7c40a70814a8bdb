"""An operator's worst day for /metrics, against a real agent process.

Not a benchmark with figures to keep: a reliability drill whose findings
go in docs/reliability.md. The agent runs as a process (libvirt's test
driver, SQLite, the admin socket); this process attacks it from plain
threads:

1. ``INSTANCES`` instances are built over the admin socket.
2. Slowloris: ``SLOW`` connections that send nothing, and as many that
   send one byte a second; a legitimate scrape must still answer.
3. Flood for ``FLOOD_S`` seconds: ``CLIENTS`` threads scrape as fast as
   they can, while one thread builds and deletes instances (names with
   quotes, backslashes, unicode) and another takes one "legitimate"
   scrape a second, timed. The agent's RSS and thread count are read
   from /proc, its hub lag from its own histogram.
4. After the flood: the series' uuids are exactly the instances listed.
5. SIGTERM in the middle of a second flood: the agent must exit 0 within
   its grace time.

    .venv/bin/python -m bench.metrics_attack [instances] [flood_seconds]

``libvirt`` mode: the agent on a private libvirtd of its own (a session
daemon run as ``nobody`` on a socket in a temporary directory, the test
driver behind it; never the host's daemon), which is then frozen
(SIGSTOP), thawed, and killed: scrapes must keep answering at once, and
``compute_agent_libvirt_connected`` must follow.

    .venv/bin/python -m bench.metrics_attack libvirt

``nonreader`` mode: an in-process server whose body is ``MB`` megabytes,
8 clients with a 4 kB receive buffer that never read, and one scrape
beside them, timed.

    .venv/bin/python -m bench.metrics_attack nonreader 5
"""

from __future__ import annotations

import itertools
import os
import pathlib
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid as uuidlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from compute_agent.admin.client import AdminClient
from tests.functional.agent_process import REPO, AgentProcess, free_port, manage
from tests.functional.libvirt_drill import private_libvirtd

CLIENTS = 16
SLOW = 64
NAMES = ('q "x" \\ y', "n\u00e9e \u2603", "plain", "tab\there")


def get(port: int, timeout: float = 30) -> tuple[int, bytes, float]:
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        chunks = []
        while chunk := sock.recv(1 << 16):
            chunks.append(chunk)
    data = b"".join(chunks)
    status = int(data[9:12]) if data.startswith(b"HTTP/1.0 ") else 0
    return status, data.split(b"\r\n\r\n", 1)[-1], time.monotonic() - t0


def proc_status(pid: int) -> dict[str, int]:
    out = {}
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "Threads"):
            out[key] = int(value.split()[0])
    return out


def lag_over(body: bytes, bound: str = "0.05") -> tuple[float, float]:
    """(wake-ups later than ``bound`` s, all wake-ups) from the hub lag histogram."""
    text = body.decode()
    le = re.search(rf'compute_agent_hub_lag_seconds_bucket{{le="{bound}"}} (\S+)', text)
    total = re.search(r"compute_agent_hub_lag_seconds_count (\S+)", text)
    assert le and total
    return float(total.group(1)) - float(le.group(1)), float(total.group(1))


def series_uuids(body: bytes) -> set[str]:
    return set(re.findall(r'compute_agent_instance_info\{uuid="([^"]+)"', body.decode()))


def start(root: pathlib.Path, extra: str = "") -> tuple[AgentProcess, int, AdminClient]:
    conf = root / "attack.conf"
    conf.write_text(
        f"[DEFAULT]\nstate_path = {root}/state\nhost = attack-host\nreport_interval = 5\n"
        "[compute]\nstats_interval = 2\n" + extra
    )
    files = [REPO / "etc" / "compute-agent.conf", conf]
    assert manage("db", "sync", config_files=files).returncode == 0
    port = free_port()
    proc = AgentProcess(files, metrics_port=port)
    proc.wait_for("heartbeat 1", 60)
    return proc, port, AdminClient(str(root / "state" / "admin.sock"), timeout=120)


def build(admin: AdminClient, name: str) -> str:
    uuid = str(uuidlib.uuid4())
    admin.call(
        "build_instance",
        {"instance": {"uuid": uuid, "name": name, "vcpus": 1, "memory_mb": 64}},
    )
    return uuid


def slowloris(port: int) -> None:
    socks = []
    for n in range(2 * SLOW):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        socks.append(sock)
        if n % 2:
            sock.sendall(b"G")
    t0 = time.monotonic()
    statuses = []
    for _ in range(8):
        for n, sock in enumerate(socks):
            if n % 2:
                try:
                    sock.sendall(b"E")
                except OSError:
                    pass
        statuses.append(get(port)[0])
        time.sleep(1)
    print(f"slowloris {2 * SLOW} conns: 8 scrapes -> {Counter(statuses)} "
          f"in {time.monotonic() - t0:.1f} s")  # fmt: skip
    for sock in socks:
        sock.close()


def flood(port: int, admin: AdminClient, seconds: float, pid: int, live: set[str]) -> None:
    stop = threading.Event()
    statuses: Counter = Counter()
    legit: list[float] = []
    mem: list[dict[str, int]] = []
    churn = Counter()

    def scraper() -> None:
        while not stop.is_set():
            try:
                statuses[get(port)[0]] += 1
            except OSError as exc:
                statuses[type(exc).__name__] += 1

    def churner() -> None:
        for name in itertools.cycle(NAMES):
            if stop.is_set():
                return
            try:
                uuid = build(admin, name)
                live.add(uuid)
                churn["built"] += 1
                if churn["built"] % 2:
                    admin.call("delete_instance", {"instance_uuid": uuid})
                    live.discard(uuid)
                    churn["deleted"] += 1
            except Exception as exc:  # noqa: BLE001 - counted
                churn[type(exc).__name__] += 1

    def watcher() -> None:
        while not stop.wait(1):
            mem.append(proc_status(pid))
            try:
                status, _, took = get(port)
                legit.append(took if status == 200 else float("inf"))
            except OSError:
                legit.append(float("inf"))

    before = lag_over(get(port)[1])
    threads = [threading.Thread(target=scraper) for _ in range(CLIENTS)]
    threads += [threading.Thread(target=churner), threading.Thread(target=watcher)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join(60)
    wall = time.monotonic() - t0
    after = lag_over(get(port)[1])
    n = sum(statuses.values())
    print(f"flood {CLIENTS} clients {wall:.0f} s: {n / wall:.0f} req/s {dict(statuses)}")
    finite = [x for x in legit if x != float("inf")]
    median_ms = statistics.median(finite or [0]) * 1000
    print(f"  legit scrape 1/s: {len(finite)}/{len(legit)} ok, median {median_ms:.0f} ms "
          f"max {max(legit or [0]) * 1000:.0f} ms")  # fmt: skip
    print(f"  RSS kB {mem[0]['VmRSS']} -> {mem[-1]['VmRSS']} (max {max(m['VmRSS'] for m in mem)}),"
          f" threads max {max(m['Threads'] for m in mem)}")  # fmt: skip
    print(f"  hub wake-ups > 50 ms: {after[0] - before[0]:.0f} of {after[1] - before[1]:.0f}")
    print(f"  churn {dict(churn)}")


def value(port: int, name: str) -> tuple[float, float]:
    """(the sample's value, how long the scrape took)."""
    status, body, took = get(port)
    assert status == 200, (status, body[:300])
    match = re.search(rf"^{name} (\S+)$", body.decode(), re.M)
    assert match, name
    return float(match.group(1)), took


def watch(port: int, name: str, want: float, limit: float) -> str:
    t0, worst = time.monotonic(), 0.0
    while time.monotonic() - t0 < limit:
        got, took = value(port, name)
        worst = max(worst, took)
        if got == want:
            took = time.monotonic() - t0
            return f"{name} = {want} after {took:.1f} s (slowest scrape {worst:.3f} s)"
        time.sleep(0.2)
    return f"{name} still not {want} after {limit} s (slowest scrape {worst:.3f} s)"


def libvirt_drill() -> None:
    root = pathlib.Path(tempfile.mkdtemp(prefix="ca-metrics-lv-"))
    daemon, uri = private_libvirtd(root / "lv")
    proc = None
    try:
        proc, port, admin = start(root, f"[libvirt]\nconnection_uri = {uri}\n")
        if os.environ.get("ATTACK_STRACE"):  # who closes what (the file named there)
            subprocess.Popen(
                ["strace", "-f", "-tt", "-e", "trace=close,accept4,connect,socket,dup2,dup3",
                 "-o", os.environ["ATTACK_STRACE"], "-p", str(proc.proc.pid)],
                stderr=subprocess.DEVNULL,
            )  # fmt: skip
            time.sleep(1)
        for i in range(20):
            build(admin, f"lv-{i}")
        print(watch(port, "compute_agent_libvirt_connected", 1.0, 10))
        daemon.send_signal(signal.SIGSTOP)
        print("libvirtd frozen:", watch(port, "compute_agent_libvirt_connected", 0.0, 60))
        daemon.send_signal(signal.SIGCONT)
        print("thawed:", watch(port, "compute_agent_libvirt_connected", 1.0, 60))
        daemon.kill()
        daemon.wait(10)
        print("killed:", watch(port, "compute_agent_libvirt_connected", 0.0, 60))
        served = series_uuids(get(port)[1])
        print(f"instances still served from the last read: {len(served)}")
        daemon, _ = private_libvirtd(root / "lv")
        print("restarted:", watch(port, "compute_agent_libvirt_connected", 1.0, 90))
        rc, took = proc.terminate(timeout=30)
        print(f"SIGTERM: rc {rc} in {took:.1f} s; Traceback in log: {'Traceback' in proc.output}")
        for line in proc.lines:
            if "hub" in line.lower() and ("WARNING" in line or "ERROR" in line):
                print("   ", line[:240])
    except Exception:
        if proc is not None:
            (root / "agent.log").write_text(proc.output)
            print("agent rc", proc.proc.poll(), "log:", root / "agent.log")
        raise
    finally:
        if proc is not None:
            proc.kill()
        daemon.send_signal(signal.SIGCONT)
        daemon.kill()
        daemon.wait(10)


def nonreader_drill(megabytes: float) -> None:
    from compute_agent.metrics.server import MetricsServer

    body = "x" * int(megabytes * 1_000_000)

    class Collector:
        def collect(self) -> Any:
            return iter(())

        def instance_text(self) -> str:
            return body

    server = MetricsServer("127.0.0.1", 0, Collector())
    server.start()
    port = server.bound_port
    hold = []
    try:
        for _ in range(8):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", port))
            sock.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            hold.append(sock)
        time.sleep(0.5)
        status, data, took = get(port, timeout=120)
        print(f"body {megabytes} MB, 8 clients that never read: a scrape got {status}, "
              f"{len(data)} bytes in {took:.1f} s")  # fmt: skip
    finally:
        for sock in hold:
            sock.close()
        server.stop()


def main(argv: list[str] | None = None) -> None:
    argv = argv or []
    if argv[:1] == ["libvirt"]:
        libvirt_drill()
        return
    if argv[:1] == ["nonreader"]:
        nonreader_drill(float(argv[1]) if len(argv) > 1 else 5)
        return
    instances = int(argv[0]) if argv else 1000
    seconds = float(argv[1]) if len(argv) > 1 else 60
    root = pathlib.Path(tempfile.mkdtemp(prefix="ca-metrics-attack-"))
    proc, port, admin = start(root)
    try:
        t0 = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            live = set(pool.map(lambda i: build(admin, f"attack-{i}"), range(instances)))
        print(f"built {instances} in {time.monotonic() - t0:.0f} s; "
              f"scrape {len(get(port)[1])} bytes")  # fmt: skip
        slowloris(port)
        flood(port, admin, seconds, proc.proc.pid, live)
        listed = {i["uuid"] for i in admin.call("list_instances")}
        served = series_uuids(get(port)[1])
        print(f"after churn: listed {len(listed)} served {len(served)} tracked {len(live)}; "
              f"stale {len(served - listed)} missing {len(listed - served)}")  # fmt: skip
        # SIGTERM in the middle of a flood.
        stopper = threading.Thread(target=flood, args=(port, admin, 20, proc.proc.pid, set()))
        stopper.daemon = True
        stopper.start()
        time.sleep(5)
        rc, took = proc.terminate(timeout=30)
        print(f"SIGTERM during a flood: rc {rc} in {took:.1f} s")
        tracebacks = [line for line in proc.lines if "Traceback" in line or "ERROR" in line]
        print(f"log: {len(proc.lines)} lines, {len(tracebacks)} with Traceback/ERROR")
        for line in tracebacks[:5]:
            print("   ", line[:200])
    finally:
        proc.kill()


if __name__ == "__main__":
    main(sys.argv[1:])
