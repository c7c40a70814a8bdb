"""Helpers shared by the benchmarks: hosts of N instances, timing, tables."""

from __future__ import annotations

import collections
import json
import os
import pathlib
import platform
import tempfile
import time
import uuid as uuidlib
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from oslo_config import cfg

from compute_agent import green
from compute_agent.conf import register_all
from compute_agent.db import migration
from compute_agent.db.api import Database
from compute_agent.db.models import Instance
from compute_agent.states import PowerState
from compute_agent.utils import utcnow

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
HOST = "bench-host"


def uuid_for(i: int) -> str:
    return str(uuidlib.UUID(int=i + 1, version=4))


def name_for(i: int) -> str:
    return f"instance-{uuid_for(i)}"


def make_conf(**overrides: Any) -> cfg.ConfigOpts:
    conf = cfg.ConfigOpts()
    register_all(conf)
    conf([], project="compute-agent")
    conf.set_override("host", HOST)
    conf.set_override("periodic_fuzzy_delay", 0)
    conf.set_override("state_path", tempfile.mkdtemp(prefix="ca-bench-"))
    for key, value in overrides.items():
        group, _, name = key.rpartition(".")
        conf.set_override(name, value, group=group or None)
    return conf


def make_db(count: int, power_state: str = "running", url: str | None = None) -> Database:
    """A migrated SQLite database holding ``count`` active instances of HOST."""
    if url is None:
        url = f"sqlite:///{tempfile.mkdtemp(prefix='ca-bench-')}/bench.sqlite"
    db = Database(url)
    migration.upgrade(db)
    insert_hosts(db, [HOST], count, power_state)
    return db


def insert_hosts(db: Database, hosts: list[str], count: int, power_state: str = "running") -> None:
    """``count`` active instances for each of ``hosts``; host h's are numbered from h * count."""
    now = utcnow()
    with db.engine.begin() as conn:
        for h, host in enumerate(hosts):
            rows = [
                dict(
                    uuid=uuid_for(h * count + i),
                    host=host,
                    domain_name=name_for(h * count + i),
                    vm_state="active",
                    task_state=None,
                    power_state=power_state,
                    vcpus=1,
                    memory_mb=64,
                    created_at=now,
                    updated_at=now,
                    deleted=False,
                )
                for i in range(count)
            ]
            for start in range(0, len(rows), 5000):
                conn.execute(sa.insert(Instance), rows[start : start + 5000])


def fake_driver(count: int, latency: float = 0.0, bulk: bool = True):
    from compute_agent.virt.fake import FakeDriver

    driver = FakeDriver(latency=latency, bulk=bulk)
    driver.init_host(HOST)
    for i in range(count):
        driver.add_domain(name_for(i), uuid_for(i), PowerState.RUNNING)
    return driver


class Ticker:
    """A greenthread that asks to wake every ``period`` s and records how late it was."""

    def __init__(self, period: float = 0.01) -> None:
        self.period = period
        self.lateness: list[float] = []
        self._gt: Any = None

    def start(self) -> Ticker:
        self._gt = green.spawn(self._run, name="ticker")
        return self

    def _run(self) -> None:
        while True:
            asked = green.monotonic()
            green.sleep(self.period)
            self.lateness.append(max(0.0, green.monotonic() - asked - self.period))

    def stop(self) -> list[float]:
        self._gt.cancel()
        return self.lateness


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def timed(fn: Any, *args: Any) -> tuple[float, Any]:
    t0 = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - t0, result


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def save(name: str, data: dict[str, Any]) -> pathlib.Path:
    RESULTS.mkdir(exist_ok=True)
    data = dict(
        data, machine=f"{platform.node()} {os.cpu_count()} cpus", python=platform.python_version()
    )
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, default=str))
    return path


LIBVIRTD_SOCKET = "/run/libvirt/libvirt-sock"


def libvirtd_running() -> bool:
    """True when a libvirtd answers on the system socket (tools/setup-libvirtd.sh)."""
    import socket

    if not os.path.exists(LIBVIRTD_SOCKET):
        return False
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(LIBVIRTD_SOCKET)
        except OSError:
            return False
    return True


def skip_without_libvirtd() -> dict[str, str] | None:
    """The result of a benchmark that needs the daemon and finds none; None when it answers.

    When it answers, libvirt's default error handler (which prints every
    error, expected ones included) is silenced for the run.
    """
    if not libvirtd_running():
        print(f"skipped: no libvirtd on {LIBVIRTD_SOCKET} (run tools/setup-libvirtd.sh)")
        return {"skipped": "no libvirtd"}
    import libvirt

    libvirt.registerErrorHandler(lambda *_: None, None)
    return None


def test_host(count: int) -> tuple[str, str]:
    """A node file of ``count`` running domains: (in-process URI, daemon URI)."""
    from tests import nodefile

    path = os.path.join(tempfile.mkdtemp(prefix="ca-bench-"), f"node-{count}.xml")
    uri = nodefile.write(
        path, [nodefile.TestDomain(name_for(i), uuid_for(i)) for i in range(count)]
    )
    return uri, uri.replace("test://", "test+unix://", 1)


# -- counting libvirt use ----------------------------------------------------

# virDomain methods that read the Python object only: no call reaches libvirtd.
LOCAL_GETTERS = frozenset({"name", "UUID", "UUIDString", "ID", "connect", "c_pointer"})


class _CountingConn:
    """Stands in for ``Host.conn``: counts each method called on the proxy."""

    def __init__(self, proxy: Any, calls: LibvirtCalls) -> None:
        self._proxy = proxy
        self._calls = calls

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._proxy, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            self._calls.add_trip(f"conn.{name}")
            return attr(*args, **kwargs)

        return call


class LibvirtCalls:
    """Counts the agent's use of libvirt, at two levels, while installed.

    *Trips*: calls the agent sends to the thread pool through
    ``Host.run`` (by the name of the function run) and through the
    ``Host.conn`` proxy. *API calls*: every method called on a
    ``libvirt.virConnect`` or ``libvirt.virDomain`` object, from any
    thread, except those made by the benchmark itself through :meth:`own`;
    ``rpc`` leaves out LOCAL_GETTERS (they read the Python object only).
    """

    def __init__(self) -> None:
        self.trips: collections.Counter[str] = collections.Counter()
        self.api: collections.Counter[str] = collections.Counter()
        self._lock = green.native_lock()
        self._excluded: set[int] = set()
        self._saved: list[tuple[Any, str, Any]] = []
        self._real_conn: Any = None

    # -- figures ------------------------------------------------------------

    def add_trip(self, name: str) -> None:
        with self._lock:
            self.trips[name] += 1

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            trips, api = dict(self.trips), dict(self.api)
        return {
            "trips": sum(trips.values()),
            "api": sum(api.values()),
            "rpc": sum(n for k, n in api.items() if k.split(".")[-1] not in LOCAL_GETTERS),
            "trips_by_name": trips,
            "api_by_name": api,
        }

    @staticmethod
    def delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
        """What was counted between two snapshots."""
        out: dict[str, Any] = {k: after[k] - before[k] for k in ("trips", "api", "rpc")}
        for key in ("trips_by_name", "api_by_name"):
            names = set(before[key]) | set(after[key])
            diff = {n: after[key].get(n, 0) - before[key].get(n, 0) for n in sorted(names)}
            out[key] = {n: v for n, v in diff.items() if v}
        return out

    # -- the benchmark's own calls ----------------------------------------

    def own(self, fn: Any, *args: Any) -> Any:
        """``fn(*args)`` in the thread pool, not counted (the benchmark's own calls)."""

        def body() -> Any:
            tid = green.native_thread_id()
            with self._lock:
                self._excluded.add(tid)
            try:
                return fn(*args)
            finally:
                with self._lock:
                    self._excluded.discard(tid)

        return green.execute(body)

    def raw_connection(self, host: Any) -> Any:
        """The raw virConnect of a Host, for the benchmark's own (uncounted) calls."""
        conn = self._real_conn.fget(host) if self._real_conn is not None else host.conn
        return green.unproxy(conn)

    # -- patching -----------------------------------------------------------

    def install(self) -> LibvirtCalls:
        import libvirt

        from compute_agent.virt.libvirt.host import Host

        counter = self
        real_run = Host.run
        real_conn = self._real_conn = Host.conn

        def run(host: Any, fn: Any, *args: Any) -> Any:
            counter.add_trip(getattr(fn, "__name__", "run"))
            return real_run(host, fn, *args)

        def conn(host: Any) -> Any:
            return _CountingConn(real_conn.fget(host), counter)

        self._patch(Host, "run", run)
        self._patch(Host, "conn", property(conn))
        for cls in (libvirt.virConnect, libvirt.virDomain):
            for name, value in list(vars(cls).items()):
                if name.startswith("_") or not callable(value):
                    continue
                self._patch(cls, name, self._counting(f"{cls.__name__}.{name}", value))
        return self

    def uninstall(self) -> None:
        while self._saved:
            owner, name, value = self._saved.pop()
            setattr(owner, name, value)
        self._real_conn = None

    def __enter__(self) -> LibvirtCalls:
        return self.install()

    def __exit__(self, *exc: Any) -> None:
        self.uninstall()

    def _patch(self, owner: Any, name: str, value: Any) -> None:
        self._saved.append((owner, name, vars(owner)[name]))
        setattr(owner, name, value)

    def _counting(self, key: str, method: Any) -> Any:
        counter = self

        def counted(*args: Any, **kwargs: Any) -> Any:
            tid = green.native_thread_id()
            with counter._lock:
                if tid not in counter._excluded:
                    counter.api[key] += 1
            return method(*args, **kwargs)

        counted.__name__ = method.__name__
        return counted


def load_average() -> str:
    """The machine's 1, 5 and 15 min load averages: other work skews the timings."""
    return " / ".join(f"{x:.1f}" for x in os.getloadavg())


def cpu_seconds() -> float:
    """CPU time of this process (every thread, user + system)."""
    return time.process_time()


# -- real guests on qemu:///system -------------------------------------------

QEMU_URI = "qemu:///system"


def remove_domains(conn: Any, uuids: Sequence[str]) -> list[str]:
    """Destroy and undefine the domains of ``uuids`` (blocking); return errors.

    Only these UUIDs are touched: other users' domains on the host never are.
    """
    import libvirt

    errors = []
    for uuid in uuids:
        try:
            dom = conn.lookupByUUIDString(uuid)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                errors.append(f"{uuid}: {exc}")
            continue
        try:
            if dom.isActive():
                dom.destroy()
            dom.undefine()
        except libvirt.libvirtError as exc:
            errors.append(f"{uuid}: {exc}")
    return errors


def server_database(backend: str = "postgresql") -> tuple[str, Any] | None:
    """A throw-away database on a local server: (URL, drop function), or None if unreachable.

    The server URL comes from COMPUTE_AGENT_TEST_POSTGRESQL, as for the tests.
    """
    if backend != "postgresql":
        raise ValueError(f"unsupported backend {backend}")
    admin_url = sa.make_url(
        os.environ.get(
            "COMPUTE_AGENT_TEST_POSTGRESQL",
            "postgresql+pg8000://postgres@127.0.0.1:5432/postgres",
        )
    )
    name = f"ca_bench_{uuidlib.uuid4().hex[:10]}"
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f"CREATE DATABASE {name}"))
    except Exception:  # noqa: BLE001 - no server: the caller skips this backend
        admin.dispose()
        return None

    def drop() -> None:
        with admin.connect() as conn:
            conn.execute(sa.text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        admin.dispose()

    return admin_url.set(database=name).render_as_string(hide_password=False), drop
