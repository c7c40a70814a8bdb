"""Fleet: N real agents on one RabbitMQ and one PostgreSQL, directly or through PgBouncer.

``python -m bench fleet --agents N --instances M [--via-pgbouncer]``

Each agent is the real ``compute-agent`` process (hosts fleet-0..N-1 plus
the run's suffix), libvirt driver on a ``test:///abs/node-i.xml`` host of
M running domains that match its M rows (steady state). This process is the
scheduler: it waits until every host answers a ping (the fleet's start-up),
leaves the fleet idle, pings every host (``ping_all``), then makes every
host sync at once (``sync_power_states``), pinging again meanwhile.

Figures: start-up, fan-out ping p50/p99 idle and during the syncs, each
agent's own sync duration, services up (heartbeat age against
service_down_time, read from the database as a scheduler would), the
server connections (pg_stat_activity of the run's database) idle and at
peak, heartbeat lateness (oldest heartbeat minus report_interval), idle CPU
and RSS per agent, and every database error line in any agent's log.

Every agent is stopped at the end, killed if it does not stop, even when
the run fails; their pids are also written to ``$TMPDIR/ca-fleet-<run>.pids``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid as uuidlib
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa

from bench.common import insert_hosts, name_for, save, table, uuid_for
from bench.rpc_common import REPO, BenchRabbit, interrupts_to_main
from compute_agent import green
from compute_agent.db import migration
from compute_agent.db.api import Database
from compute_agent.db.models import Service
from compute_agent.rpc import BINARY
from compute_agent.rpcapi import ComputeAPI
from compute_agent.utils import percentile, utcnow

SERVER_URL = os.environ.get(
    "COMPUTE_AGENT_TEST_POSTGRESQL", "postgresql+pg8000://postgres@127.0.0.1:5432/postgres"
)
PGBOUNCER_URL = os.environ.get(
    "COMPUTE_AGENT_TEST_PGBOUNCER", "postgresql+pg8000://postgres@127.0.0.1:6432/postgres"
)
DB_PREFIX = os.environ.get("COMPUTE_AGENT_BENCH_DB_PREFIX", "ca_fleet_")
PGBOUNCER_PIDFILE = os.environ.get(
    "COMPUTE_AGENT_TEST_PGBOUNCER_PIDFILE", "/var/run/postgresql/pgbouncer-compute-agent-test.pid"
)
REPORT_INTERVAL = 10
DOWN_TIME = 60
# Lines of an agent's log that mean the database failed it.
DB_ERROR = re.compile(r"database unavailable|DatabaseUnavailable|DatabaseBusy|too many", re.I)
_TICKS = os.sysconf("SC_CLK_TCK")


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench fleet")
    parser.add_argument("--agents", type=int, default=10)
    parser.add_argument("--instances", type=int, default=100)
    parser.add_argument("--via-pgbouncer", action="store_true")
    parser.add_argument("--pool-size", type=int, default=None, help="[database] pool_size")
    parser.add_argument("--idle", type=float, default=30.0, help="idle seconds measured")
    parser.add_argument("--ping-rounds", type=int, default=20)
    parser.add_argument("--sync-rounds", type=int, default=3)
    parser.add_argument("--stagger", type=float, default=0.1, help="seconds between spawns")
    parser.add_argument("--startup-timeout", type=float, default=600.0)
    parser.add_argument("--keep-logs", action="store_true")
    parser.add_argument(
        "--agents-nice",
        type=int,
        default=0,
        help="nice value of the agents: >0 puts the scheduler (this process) first, "
        "as if it ran on a machine of its own",
    )
    args = parser.parse_args(argv)
    if args.agents < 1 or args.instances < 0 or args.idle < 0 or args.ping_rounds < 1:
        parser.error("--agents >= 1, --instances >= 0, --idle >= 0, --ping-rounds >= 1")
    return args


class Agent:
    """One real compute-agent process with its own state directory, node file and log."""

    def __init__(self, host: str, workdir: pathlib.Path, conf_text: str, nice: int = 0) -> None:
        self.host = host
        self.dir = workdir
        self.log = workdir / "agent.log"
        conf = workdir / "agent.conf"
        conf.write_text(conf_text)
        self.proc = subprocess.Popen(
            # nice execs the agent: the pid is the agent's.
            [*(["nice", "-n", str(nice)] if nice else []), sys.executable, "-m"]
            + ["compute_agent.cmd.agent", "--config-file", str(conf)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=open(workdir / "stderr.log", "w"),  # the child keeps it
            cwd=REPO,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
            start_new_session=True,  # a Ctrl-C reaches the benchmark, which stops us in order
        )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def cpu_s(self) -> float:
        try:
            stat = pathlib.Path(f"/proc/{self.proc.pid}/stat").read_text()
        except OSError:
            return 0.0
        fields = stat.rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICKS

    def rss_mb(self) -> float:
        try:
            for line in pathlib.Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return 0.0

    def pss_mb(self) -> float:
        """Proportional set size: shared library pages split among the processes sharing them."""
        try:
            for line in (
                pathlib.Path(f"/proc/{self.proc.pid}/smaps_rollup").read_text().splitlines()
            ):
                if line.startswith("Pss:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return 0.0

    def log_lines(self) -> list[str]:
        lines: list[str] = []
        for path in (self.log, self.dir / "stderr.log"):
            try:
                lines += path.read_text(errors="replace").splitlines()
            except OSError:
                pass
        return lines


def _pid_cpu_s(pid: int | None) -> float:
    if pid is None:
        return 0.0
    try:
        fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICKS


def _pgbouncer_pid() -> int | None:
    try:
        return int(pathlib.Path(PGBOUNCER_PIDFILE).read_text().strip())
    except (OSError, ValueError):
        return None


def _stop_all(agents: list[Agent], grace: float = 30.0) -> list[str]:
    """SIGTERM every agent, wait ``grace`` s in all, SIGKILL the rest; notes on the unusual."""
    for agent in agents:
        if agent.alive():
            agent.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for agent in agents:
        while agent.alive() and time.monotonic() < deadline:
            time.sleep(0.05)
    notes = []
    for agent in agents:
        if agent.alive():
            agent.proc.kill()
            agent.proc.wait(10)
            notes.append(f"{agent.host}: killed after {grace:.0f} s")
        elif agent.proc.returncode not in (0, None):
            notes.append(f"{agent.host}: exit status {agent.proc.returncode}")
    return notes


class Database_:
    """The run's database on the server, and the scheduler's view of it."""

    def __init__(self) -> None:
        self.admin = sa.create_engine(SERVER_URL, isolation_level="AUTOCOMMIT")
        self.name = f"{DB_PREFIX}{uuidlib.uuid4().hex[:10]}"
        with self.admin.connect() as conn:
            conn.execute(sa.text(f"CREATE DATABASE {self.name}"))
        self.url = sa.make_url(SERVER_URL).set(database=self.name).render_as_string(False)
        self.pooler_url = sa.make_url(PGBOUNCER_URL).set(database=self.name).render_as_string(False)
        self.db = Database(self.url, pool_size=2)  # set-up only, disposed before the agents
        # The scheduler's reads: named, so the count of the agents' connections leaves them out.
        self.reader = sa.create_engine(
            self.url, poolclass=sa.pool.NullPool, connect_args={"application_name": "fleet-bench"}
        )

    def server_connections(self) -> int:
        with self.admin.connect() as conn:
            return int(
                conn.execute(
                    sa.text(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = :d "
                        "AND application_name <> 'fleet-bench'"
                    ),
                    {"d": self.name},
                ).scalar_one()
            )

    def heartbeats(self) -> dict[str, float]:
        """Each host's heartbeat age in seconds (None rows: never beat)."""
        now = utcnow()
        with self.reader.connect() as conn:
            rows = conn.execute(
                sa.select(Service.host, Service.updated_at, Service.stopped_at).where(
                    Service.binary == BINARY
                )
            ).all()
        return {
            host: (now - updated).total_seconds() if updated and stopped is None else 1e9
            for host, updated, stopped in rows
        }

    def drop(self) -> None:
        self.db.dispose()
        self.reader.dispose()
        with self.admin.connect() as conn:
            conn.execute(sa.text(f"DROP DATABASE IF EXISTS {self.name} WITH (FORCE)"))
        self.admin.dispose()


def _node_file(path: pathlib.Path, h: int, count: int) -> str:
    from tests import nodefile

    domains = [
        nodefile.TestDomain(name_for(h * count + i), uuid_for(h * count + i)) for i in range(count)
    ]
    return nodefile.write(str(path), domains)


def _agent_conf(
    host: str, workdir: pathlib.Path, uri: str, db_url: str, args: argparse.Namespace, ex: str
) -> str:
    database = [f"connection = {db_url}"]
    if args.via_pgbouncer:
        database.append("transaction_pooling = true")
    if args.pool_size:
        database.append(f"pool_size = {args.pool_size}")
    return "\n".join(
        [
            "[DEFAULT]",
            f"host = {host}",
            f"state_path = {workdir}/state",
            f"log_file = {workdir}/agent.log",
            f"transport_url = {os.environ.get('COMPUTE_AGENT_TEST_RABBIT', 'rabbit://guest:guest@127.0.0.1:5672/')}",
            f"control_exchange = {ex}",
            "compute_driver = libvirt",
            f"report_interval = {REPORT_INTERVAL}",
            f"service_down_time = {DOWN_TIME}",
            "[libvirt]",
            f"connection_uri = {uri}",
            "[metrics]",
            "listen_port = 0",
            "[database]",
            *database,
            "",
        ]
    )


def _sync(api: ComputeAPI, host: str) -> dict[str, Any]:
    return api.sync_power_states(host, timeout=300)


def _fanout(api: ComputeAPI, hosts: list[str], rounds: int, until: Callable[[], bool] | None):
    """``ping_all`` rounds: each round's time, each host's reply time, and the caller's CPU."""
    times: list[float] = []
    replies: list[float] = []
    failures = 0
    cpu0 = time.process_time()
    while len(times) < rounds if until is None else not until():
        t0 = green.monotonic()
        answers = api.ping_all(hosts, timeout=10)
        times.append(green.monotonic() - t0)
        failures += sum(1 for r in answers.values() if not r.ok)
        replies += [r.elapsed_s for r in answers.values() if r.ok]
    return {
        "rounds": len(times),
        "p50_s": round(percentile(times, 0.5), 4),
        "p99_s": round(percentile(times, 0.99), 4),
        "max_s": round(max(times, default=0.0), 4),
        "reply_p50_s": round(percentile(replies, 0.5), 4),
        "reply_p99_s": round(percentile(replies, 0.99), 4),
        "caller_cpu_per_round_s": round((time.process_time() - cpu0) / max(1, len(times)), 4),
        "failures": failures,
    }


class Sampler:
    """Samples server connections and heartbeat ages every ``period`` s in a greenthread."""

    def __init__(self, store: Database_, period: float = 0.5) -> None:
        self.store = store
        self.period = period
        self.connections: list[int] = []
        self.worst_age: list[float] = []
        self._stop = green.Event()
        self._task = green.spawn(self._run, name="sampler")

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.connections.append(self.store.server_connections())
                ages = self.store.heartbeats().values()
                if ages:
                    self.worst_age.append(max(ages))
            except Exception:  # noqa: BLE001 - a sample lost is not the run lost
                pass
            self._stop.wait(self.period)

    def cut(self) -> tuple[list[int], list[float]]:
        """The samples so far, and start afresh."""
        conns, ages = self.connections, self.worst_age
        self.connections, self.worst_age = [], []
        return conns, ages

    def stop(self) -> None:
        self._stop.set()
        self._task.wait()


def main(argv: list[str] | None = None) -> dict:
    args = _parse(argv or [])
    with interrupts_to_main():
        return _run(args)


def _run(args: argparse.Namespace) -> dict:
    rabbit = BenchRabbit("fleet")
    hosts = [rabbit.host(f"fleet-{i}") for i in range(args.agents)]
    work = pathlib.Path(tempfile.mkdtemp(prefix=f"ca-fleet-{rabbit.run_id}-"))
    pidfile = pathlib.Path(tempfile.gettempdir(), f"ca-fleet-{rabbit.run_id}.pids")
    store = Database_()
    agents: list[Agent] = []
    api: ComputeAPI | None = None
    sampler: Sampler | None = None
    notes: list[str] = []
    data: dict[str, Any] = {
        "agents": args.agents,
        "instances_per_agent": args.instances,
        "via_pgbouncer": args.via_pgbouncer,
        "pool_size": args.pool_size or "default",
        "agents_nice": args.agents_nice,
        "command": "python -m bench fleet " + " ".join(sys.argv[2:]),
    }
    try:
        migration.upgrade(store.db)
        insert_hosts(store.db, hosts, args.instances)
        store.db.dispose()
        db_url = store.pooler_url if args.via_pgbouncer else store.url
        for host in hosts:
            (work / host).mkdir()
        uris = [
            _node_file(work / host / "node.xml", h, args.instances) for h, host in enumerate(hosts)
        ]
        sampler = Sampler(store)
        t0 = green.monotonic()
        for host, uri in zip(hosts, uris, strict=True):
            conf = _agent_conf(host, work / host, uri, db_url, args, rabbit.exchange)
            agents.append(Agent(host, work / host, conf, args.agents_nice))
            pidfile.write_text("\n".join(str(a.proc.pid) for a in agents) + "\n")
            green.sleep(args.stagger)
        spawned = green.monotonic() - t0
        api = ComputeAPI(rabbit.client_conf(), timeout=10)
        answered: dict[str, float] = {}
        while len(answered) < len(hosts) and green.monotonic() - t0 < args.startup_timeout:
            waiting = [h for h in hosts if h not in answered]
            for host, reply in api.ping_all(waiting, timeout=3).items():
                if reply.ok:
                    answered[host] = green.monotonic() - t0
            if sum(not a.alive() for a in agents) and all(
                a.host in answered or not a.alive() for a in agents
            ):
                break
            green.sleep(1)
        dead = [a.host for a in agents if not a.alive()]
        startup = {
            "spawned_s": round(spawned, 1),
            "all_answer_s": round(max(answered.values()), 1) if answered else None,
            "answering": len(answered),
            "exited": len(dead),
        }
        data["startup"] = startup
        print(f"fleet start-up: {startup}", flush=True)
        if len(answered) < len(hosts):
            raise RuntimeError(f"{len(hosts) - len(answered)} agents never answered: {dead[:5]}")
        sampler.cut()

        # Idle: CPU and RSS per agent, connections, heartbeats.
        bouncer = _pgbouncer_pid() if args.via_pgbouncer else None
        cpu0 = [a.cpu_s() for a in agents]
        bouncer0 = _pid_cpu_s(bouncer)
        green.sleep(args.idle)
        bouncer_idle = (_pid_cpu_s(bouncer) - bouncer0) / max(args.idle, 1e-9) * 100
        cpu_idle = [
            (a.cpu_s() - c) / max(args.idle, 1e-9) * 100 for a, c in zip(agents, cpu0, strict=True)
        ]
        rss = [a.rss_mb() for a in agents]
        pss = [a.pss_mb() for a in agents]
        conns_idle, ages_idle = sampler.cut()
        ages_now = store.heartbeats()
        data["idle"] = {
            "seconds": args.idle,
            "cpu_pct_of_core_per_agent_median": round(statistics.median(cpu_idle), 2),
            "cpu_pct_of_core_per_agent_max": round(max(cpu_idle), 2),
            "rss_mb_per_agent_median": round(statistics.median(rss), 1),
            "rss_mb_per_agent_max": round(max(rss), 1),
            "rss_mb_total": round(sum(rss)),
            "pss_mb_per_agent_median": round(statistics.median(pss), 1),
            "pss_mb_total": round(sum(pss)),
            "server_connections_max": max(conns_idle, default=None),
            "server_connections_min": min(conns_idle, default=None),
            "services_up": sum(age <= DOWN_TIME for age in ages_now.values()),
            "heartbeat_age_max_s": round(max(ages_idle, default=0.0), 2),
            "pgbouncer_cpu_pct_of_core": round(bouncer_idle, 2) if bouncer else None,
        }
        print(f"idle: {data['idle']}", flush=True)
        data["ping_idle"] = _fanout(api, hosts, args.ping_rounds, None)
        print(f"fan-out ping, idle: {data['ping_idle']}", flush=True)

        # Every host syncs at once, a few times; pings go on meanwhile in the last round.
        durations: list[float] = []
        walls: list[float] = []
        errors = 0
        cpu0 = [a.cpu_s() for a in agents]
        bouncer0, t_sync = _pid_cpu_s(bouncer), green.monotonic()
        ping_during: dict[str, Any] = {}
        for round_no in range(args.sync_rounds):
            t1 = green.monotonic()
            tasks = [green.submit(_sync, api, host, name=f"sync-{host}") for host in hosts]
            if round_no == args.sync_rounds - 1:
                ping_during = _fanout(
                    api, hosts, 0, until=lambda ts=tasks: all(t.done() for t in ts)
                )
            for task in tasks:
                try:
                    summary = task.result(600)
                    durations.append(summary["duration_s"])
                    errors += summary.get("errors", 0)
                except Exception as exc:  # noqa: BLE001 - counted and shown
                    errors += 1
                    notes.append(f"sync: {type(exc).__name__}: {exc}")
            walls.append(green.monotonic() - t1)
        sync_cpu = [(a.cpu_s() - c) / args.sync_rounds for a, c in zip(agents, cpu0, strict=True)]
        bouncer_sync = (_pid_cpu_s(bouncer) - bouncer0) / (green.monotonic() - t_sync) * 100
        conns_sync, ages_sync = sampler.cut()
        rss_after = [a.rss_mb() for a in agents]
        data["sync"] = {
            "rounds": args.sync_rounds,
            "duration_s_median": round(statistics.median(durations), 3) if durations else None,
            "duration_s_p99": round(percentile(durations, 0.99), 3) if durations else None,
            "duration_s_max": round(max(durations), 3) if durations else None,
            "wall_s": [round(w, 2) for w in walls],
            "errors": errors,
            "agent_cpu_s_per_sync_median": round(statistics.median(sync_cpu), 3),
            "server_connections_max": max(conns_sync, default=None),
            "heartbeat_age_max_s": round(max(ages_sync, default=0.0), 2),
            "rss_mb_per_agent_median_after": round(statistics.median(rss_after), 1),
            "pgbouncer_cpu_pct_of_core": round(bouncer_sync, 1) if bouncer else None,
        }
        data["ping_during_sync"] = ping_during
        print(f"sync: {data['sync']}", flush=True)
        print(f"fan-out ping during the syncs: {ping_during}", flush=True)
        final = store.heartbeats()
        data["services_up_end"] = sum(age <= DOWN_TIME for age in final.values())
        data["heartbeat_lateness_max_s"] = round(
            max(data["idle"]["heartbeat_age_max_s"], data["sync"]["heartbeat_age_max_s"])
            - REPORT_INTERVAL,
            2,
        )
    finally:
        if sampler is not None:
            sampler.stop()
        if api is not None:
            api.close()
        notes += _stop_all(agents)
        db_errors = [
            f"{a.host}: {line}" for a in agents for line in a.log_lines() if DB_ERROR.search(line)
        ]
        errors_logged = [
            f"{a.host}: {line}"
            for a in agents
            for line in a.log_lines()
            if " ERROR " in line or "Traceback" in line
        ]
        data["db_error_lines"] = len(db_errors)
        data["db_error_examples"] = db_errors[:5]
        data["error_lines"] = len(errors_logged)
        data["error_examples"] = errors_logged[:5]
        notes += rabbit.cleanup()
        try:
            store.drop()
        except Exception as exc:  # noqa: BLE001 - reported
            notes.append(f"could not drop the database: {exc}")
        if not args.keep_logs and not db_errors and not errors_logged:
            shutil.rmtree(work, ignore_errors=True)
        else:
            notes.append(f"logs kept in {work}")
        pidfile.unlink(missing_ok=True)
        data["notes"] = notes
    _print(data)
    save("fleet", data)
    return data


def _print(data: dict[str, Any]) -> None:
    idle, sync, pi, ps = data["idle"], data["sync"], data["ping_idle"], data["ping_during_sync"]
    rows = [
        ["fleet start-up (all answer a ping)", f"{data['startup']['all_answer_s']} s"],
        ["services up (idle / end)", f"{idle['services_up']} / {data['services_up_end']}"],
        [
            "fan-out ping round idle p50 / p99",
            f"{pi['p50_s'] * 1000:.0f} / {pi['p99_s'] * 1000:.0f} ms",
        ],
        [
            "  each host's reply within a round p50 / p99; caller CPU per round",
            f"{pi['reply_p50_s'] * 1000:.0f} / {pi['reply_p99_s'] * 1000:.0f} ms; "
            f"{pi['caller_cpu_per_round_s'] * 1000:.0f} ms",
        ],
        [
            "fan-out ping round during syncs p50 / p99",
            f"{ps.get('p50_s', 0) * 1000:.0f} / {ps.get('p99_s', 0) * 1000:.0f} ms",
        ],
        [
            "sync (each agent's own) median / p99 / max",
            f"{sync['duration_s_median']} / {sync['duration_s_p99']} / {sync['duration_s_max']} s",
        ],
        ["all syncing at once, wall", " / ".join(f"{w} s" for w in sync["wall_s"])],
        [
            "server connections idle (min-max) / peak in syncs",
            f"{idle['server_connections_min']}-{idle['server_connections_max']} / "
            f"{sync['server_connections_max']}",
        ],
        [
            f"oldest heartbeat minus report_interval ({REPORT_INTERVAL} s), max",
            f"{data['heartbeat_lateness_max_s']} s",
        ],
        [
            "idle CPU per agent (median / max)",
            f"{idle['cpu_pct_of_core_per_agent_median']} / "
            f"{idle['cpu_pct_of_core_per_agent_max']} % of a core",
        ],
        [
            "RSS per agent (median / max), total",
            f"{idle['rss_mb_per_agent_median']} / "
            f"{idle['rss_mb_per_agent_max']} MB, {idle['rss_mb_total']} MB",
        ],
        [
            "PSS per agent (median), total (what the fleet really takes)",
            f"{idle['pss_mb_per_agent_median']} MB, {idle['pss_mb_total']} MB",
        ],
        [
            "database error lines / ERROR lines in logs",
            f"{data['db_error_lines']} / {data['error_lines']}",
        ],
    ]
    title = f"{data['agents']} agents x {data['instances_per_agent']} instances" + (
        ", through PgBouncer" if data["via_pgbouncer"] else ", directly on PostgreSQL"
    )
    print(table([title, "figure"], rows))
    if data["notes"]:
        print("notes:", "; ".join(data["notes"][:10]))
    print(json.dumps({k: data[k] for k in ("db_error_examples", "error_examples")}, indent=1))
