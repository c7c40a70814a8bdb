"""A forced sync of thousands of instances on a distant PostgreSQL: does the heartbeat keep up?

``python -m bench distant_db [--instances N] [--delay MS] [--runs R] [--backends eventlet,threads]``

PostgreSQL behind a TCP proxy that holds every chunk ``--delay`` ms each
way (``tests/functional/frozen_proxy.py``): a server a few milliseconds
away, as a fleet's shared database is. The real agent on a test-driver
node file of N running domains, its heartbeat at the default
``report_interval`` (10 s; it waits 8 s for its write). Each run sets
every row's power_state to ``nostate`` behind the agent's back, so a
forced sync over the admin socket writes N rows; pg8000 runs an
executemany as one round trip a row, so the sync's transactions hold the
pooled connections for seconds. Counted from the agent's log over the
run (the sync and one ``report_interval`` after it): heartbeats written,
heartbeats failed, and how often the service row went on a connection of
its own; from the sync's summary: changed, errors, duration.
"""

from __future__ import annotations

import argparse
import pathlib
import re
import statistics
import tempfile
import time
import uuid as uuidlib
from typing import Any

import sqlalchemy as sa

from bench.common import server_database
from compute_agent.admin.client import AdminClient
from compute_agent.states import PowerState
from tests import nodefile
from tests.functional.agent_process import REPO, AgentProcess, manage
from tests.functional.frozen_proxy import FrozenProxy

HOST = "distant-db"
REPORT_INTERVAL_S = 10.0
BEAT = re.compile(r"compute_agent\.service \[[^]]*\] heartbeat \d+$")


class Agent:
    """One agent process whose database is reached through the delaying proxy."""

    def __init__(self, root: pathlib.Path, backend: str, count: int, delay_s: float) -> None:
        root.mkdir()
        self.backend = backend
        made = server_database("postgresql")
        if made is None:
            raise SystemExit("distant_db needs PostgreSQL on 127.0.0.1:5432")
        self.url, self._drop = made
        direct = sa.make_url(self.url)
        self.proxy = FrozenProxy(direct.host or "127.0.0.1", direct.port or 5432, delay=delay_s)
        self.proxy.start()
        far = direct.set(host="127.0.0.1", port=self.proxy.port)
        domains = [
            nodefile.TestDomain(f"instance-{u}", u)
            for u in (str(uuidlib.UUID(int=i + 1, version=4)) for i in range(count))
        ]
        uri = nodefile.write(str(root / "node.xml"), domains)
        conf = root / "bench.conf"
        conf.write_text(
            f"[DEFAULT]\nstate_path = {root}/state\nhost = {HOST}\n"
            f"report_interval = {REPORT_INTERVAL_S:g}\n"
            "[compute]\nsync_power_state_interval = -1\nstats_interval = -1\n"
            f"[libvirt]\nconnection_uri = {uri}\n"
            f"[database]\nconnection = {far.render_as_string(hide_password=False)}\n"
        )
        setup = root / "setup.conf"  # schema and rows straight to the server: quicker
        setup.write_text(f"[database]\nconnection = {self.url}\n")
        files = [REPO / "etc" / "compute-agent.conf", conf]
        assert manage("db", "sync", config_files=[*files, setup]).returncode == 0
        self.engine = sa.create_engine(self.url)
        self._insert(domains)
        env = {"COMPUTE_AGENT_CONCURRENCY": backend}
        self.proc = AgentProcess(files, extra_env=env)
        try:
            self.proc.wait_for("admin socket listening", 300)
        except AssertionError:
            self.close()
            raise
        self.admin = AdminClient(str(root / "state" / "admin.sock"), timeout=600)

    def _insert(self, domains: list[nodefile.TestDomain]) -> None:
        now = "2026-01-01 00:00:00"
        with self.engine.begin() as conn:
            conn.execute(
                sa.text(
                    "INSERT INTO instances (uuid, host, domain_name, vm_state, power_state, "
                    "vcpus, memory_mb, created_at, updated_at, deleted) VALUES (:u, :h, :n, "
                    "'active', :p, 1, 64, :t, :t, false)"
                ),
                [
                    {"u": d.uuid, "h": HOST, "n": d.name, "p": PowerState.RUNNING.value, "t": now}
                    for d in domains
                ],
            )

    def run(self) -> dict[str, Any]:
        with self.engine.begin() as conn:  # every row wrong, behind the agent's back
            conn.execute(sa.text("UPDATE instances SET power_state = :p"), {"p": "nostate"})
        first = len(self.proc.lines)
        t0 = time.monotonic()
        summary: dict[str, Any] = self.admin.call("sync_power_states")
        wall = time.monotonic() - t0
        time.sleep(REPORT_INTERVAL_S)  # a heartbeat due during the sync reports after it
        lines = self.proc.lines[first:]
        return {
            "wall_s": wall,
            "duration_s": summary["duration_s"],
            "changed": summary["changed"],
            "errors": summary["errors"],
            "beats": sum(1 for line in lines if BEAT.search(line)),
            "missed": sum(1 for line in lines if "periodic task heartbeat failed" in line),
            "side": sum(1 for line in lines if "pooled database connections busy" in line),
            "first_error": next((line for line in lines if " ERROR " in line), None),
        }

    def close(self) -> int:
        rc = 0
        if getattr(self, "proc", None) is not None:
            rc, _ = self.proc.terminate(timeout=60)
        self.proxy.stop()
        self.engine.dispose()
        self._drop()
        return rc


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench distant_db")
    parser.add_argument("--instances", type=int, default=3000)
    parser.add_argument("--delay", type=float, default=5.0, help="ms each way per chunk")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--backends", default="eventlet,threads")
    args = parser.parse_args(argv or [])
    root = pathlib.Path(tempfile.mkdtemp(prefix="ca-distant-db-"))
    results: dict[str, list[dict[str, Any]]] = {}
    codes = []
    for backend in args.backends.split(","):
        agent = Agent(root / backend, backend, args.instances, args.delay / 1000)
        try:
            for _ in range(args.runs):
                results.setdefault(backend, []).append(agent.run())
        finally:
            codes.append(agent.close())
    print(
        f"{args.instances} instances, PostgreSQL {args.delay:g} ms away each way, "
        f"report_interval {REPORT_INTERVAL_S:g} s; per run, median (min-max) of {args.runs}"
    )
    print("| backend | sync s | changed | errors | heartbeats written | missed | side lines |")
    print("|---|---|---|---|---|---|---|")
    for backend, runs in results.items():
        print(
            f"| {backend} | {spread([r['duration_s'] for r in runs])} "
            f"| {spread([r['changed'] for r in runs])} | {spread([r['errors'] for r in runs])} "
            f"| {spread([r['beats'] for r in runs])} | {spread([r['missed'] for r in runs])} "
            f"| {spread([r['side'] for r in runs])} |"
        )
    for backend, runs in results.items():
        for r in runs:
            if r["first_error"]:
                print(f"{backend}: first error: {r['first_error']}")
    print(f"agents' exit codes: {codes}")


if __name__ == "__main__":
    main()
