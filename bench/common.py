"""Helpers shared by the benchmarks: hosts of N instances, timing, tables."""

from __future__ import annotations

import json
import math
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
    now = utcnow()
    rows = [
        dict(
            uuid=uuid_for(i),
            host=HOST,
            domain_name=name_for(i),
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
    with db.engine.begin() as conn:
        for start in range(0, len(rows), 5000):
            conn.execute(sa.insert(Instance), rows[start : start + 5000])
    return db


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
        green.kill(self._gt)
        return self.lateness


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


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


def test_host(count: int) -> tuple[str, str]:
    """A node file of ``count`` running domains: (in-process URI, daemon URI)."""
    from compute_agent.virt.libvirt import nodefile

    path = os.path.join(tempfile.mkdtemp(prefix="ca-bench-"), f"node-{count}.xml")
    uri = nodefile.write(
        path, [nodefile.TestDomain(name_for(i), uuid_for(i)) for i in range(count)]
    )
    return uri, uri.replace("test://", "test+unix://", 1)
