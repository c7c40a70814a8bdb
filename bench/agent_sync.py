"""A forced power sync of 10,000 instances through the agent process.

``python -m bench agent_sync [--instances N] [--runs R] [--backends eventlet,threads]``

The real ``compute-agent`` on libvirt's test driver (a node file of N
running domains, in-process) and SQLite, each backend in its own process.
Forced syncs over the admin socket, interleaved between the backends:

- *all changed*: every row's power_state is set to ``nostate`` behind the
  agent's back first, so the sync writes N rows (and N audit rows);
- *none changed*: the rows already agree.

Per sync: the agent's own duration (the summary's ``duration_s``), the
client's wall time, libvirt trips to the native thread by call (from
``/metrics``, before and after), and the hub's wake-ups later than 50 ms
during it (the lag histogram's delta; under threads the monitor's sleep).
Medians of ``--runs`` with min and max.
"""

from __future__ import annotations

import argparse
import pathlib
import re
import sqlite3
import statistics
import tempfile
import time
import uuid as uuidlib
from typing import Any

from compute_agent.admin.client import AdminClient
from compute_agent.states import PowerState
from tests import nodefile
from tests.functional.agent_process import REPO, AgentProcess, free_port, manage

HOST = "sync-bench"
GOAL_CHANGED_S = 1.5
GOAL_UNCHANGED_S = 1.0


def metrics(port: int) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as reply:
        body: bytes = reply.read()
    return body.decode()


def trips(text: str) -> dict[str, float]:
    pattern = r'compute_agent_libvirt_call_duration_seconds_count\{call="([^"]+)"\} (\S+)'
    return {m.group(1): float(m.group(2)) for m in re.finditer(pattern, text)}


def late_wakeups(text: str, bound: str = "0.05") -> float:
    le = re.search(rf'compute_agent_hub_lag_seconds_bucket\{{le="{bound}"\}} (\S+)', text)
    total = re.search(r"compute_agent_hub_lag_seconds_count (\S+)", text)
    return float(total.group(1)) - float(le.group(1)) if le and total else 0.0


class Agent:
    """One agent process on its own node file and database."""

    def __init__(self, root: pathlib.Path, backend: str, count: int) -> None:
        root.mkdir()
        self.backend = backend
        domains = [
            nodefile.TestDomain(f"instance-{u}", u)
            for u in (str(uuidlib.UUID(int=i + 1, version=4)) for i in range(count))
        ]
        uri = nodefile.write(str(root / "node.xml"), domains)
        self.db_path = root / "agent.db"
        conf = root / "bench.conf"
        conf.write_text(
            f"[DEFAULT]\nstate_path = {root}/state\nhost = {HOST}\n"
            "[compute]\nsync_power_state_interval = -1\nstats_interval = -1\n"
            f"[libvirt]\nconnection_uri = {uri}\n"
            f"[database]\nconnection = sqlite:///{self.db_path}\n"
        )
        files = [REPO / "etc" / "compute-agent.conf", conf]
        assert manage("db", "sync", config_files=files).returncode == 0
        self._insert(domains)
        self.port = free_port()
        env = {"COMPUTE_AGENT_CONCURRENCY": backend}
        self.proc = AgentProcess(files, extra_env=env, metrics_port=self.port)
        try:
            self.proc.wait_for("admin socket listening", 300)
        except AssertionError:
            self.proc.kill()  # never left behind
            raise
        self.admin = AdminClient(str(root / "state" / "admin.sock"), timeout=300)

    def _insert(self, domains: list[nodefile.TestDomain]) -> None:
        now = "2026-01-01 00:00:00.000000"  # as SQLAlchemy writes it: compared as text
        with sqlite3.connect(self.db_path) as db:
            db.executemany(
                "INSERT INTO instances (uuid, host, domain_name, vm_state, power_state, vcpus, "
                "memory_mb, created_at, updated_at, deleted) VALUES (?,?,?,?,?,?,?,?,?,0)",
                [
                    (d.uuid, HOST, d.name, "active", PowerState.RUNNING.value, 1, 64, now, now)
                    for d in domains
                ],
            )

    def unsettle(self) -> None:
        """Every row's power_state wrong, behind the agent's back."""
        with sqlite3.connect(self.db_path, timeout=30) as db:
            db.execute("UPDATE instances SET power_state = ?", (PowerState.NOSTATE.value,))

    def sync(self) -> dict[str, Any]:
        before = metrics(self.port)
        t0 = time.monotonic()
        summary: dict[str, Any] = self.admin.call("sync_power_states")
        wall = time.monotonic() - t0
        after = metrics(self.port)
        t_before, t_after = trips(before), trips(after)
        return {
            "duration_s": summary["duration_s"],
            "wall_s": wall,
            "changed": summary["changed"],
            "checked": summary["checked"],
            "trips": {
                k: int(v - t_before.get(k, 0)) for k, v in t_after.items() if v - t_before.get(k, 0)
            },  # fmt: skip
            "late_50ms": late_wakeups(after) - late_wakeups(before),
        }

    def stop(self) -> int:
        rc, _ = self.proc.terminate(timeout=60)
        return rc


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} s ({min(values):.3f}-{max(values):.3f})"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench agent_sync")
    parser.add_argument("--instances", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--backends", default="eventlet,threads")
    args = parser.parse_args(argv or [])
    root = pathlib.Path(tempfile.mkdtemp(prefix="ca-agent-sync-"))
    agents: list[Agent] = []
    results: dict[tuple[str, str], list[dict[str, Any]]] = {}
    try:
        for backend in args.backends.split(","):
            agents.append(Agent(root / backend, backend, args.instances))
        for _ in range(args.runs):
            for agent in agents:  # interleaved: a slow moment hits both
                agent.unsettle()
                results.setdefault((agent.backend, "all changed"), []).append(agent.sync())
                results.setdefault((agent.backend, "none changed"), []).append(agent.sync())
    finally:
        codes = [agent.stop() for agent in agents]
    print(f"{args.instances} instances, test driver in-process, SQLite; medians of {args.runs}")
    print("| backend | sync | agent's duration | client's wall | changed | trips | late >50 ms |")
    print("|---|---|---|---|---|---|---|")
    for (backend, kind), runs in results.items():
        goal = GOAL_CHANGED_S if kind == "all changed" else GOAL_UNCHANGED_S
        durations = [r["duration_s"] for r in runs]
        met = "meets" if statistics.median(durations) <= goal else "MISSES"
        print(
            f"| {backend} | {kind} | {spread(durations)} {met} {goal} s "
            f"| {spread([r['wall_s'] for r in runs])} | {runs[-1]['changed']} "
            f"| {runs[-1]['trips']} | {max(r['late_50ms'] for r in runs):.0f} |"
        )
    print(f"agents' exit codes: {codes}")
