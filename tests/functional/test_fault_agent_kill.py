"""Fault: the agent killed with SIGKILL mid-builds and mid-sync, then restarted.

Nothing runs at a SIGKILL: no clean-up, a
half-done transaction and the builds in libvirtd left as they are. The
restarted agent (same config, same database) must settle every row its
predecessor left with a task_state, claim or list every domain of its
name prefix, and bring the database in line with the hypervisor, losing no
row. SQLite in the test's directory: a kill mid-commit then also exercises
the journal's rollback on the next open (the embedded default's own case),
and the test stays clear of the server restarts other tests make.
"""

from __future__ import annotations

import concurrent.futures
import json
import pathlib
import signal
import time
import uuid as uuidlib
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import libvirt
import pytest
import sqlalchemy as sa

from compute_agent.admin.client import AdminClient, AgentUnreachable, ClientError
from compute_agent.db.api import Database
from compute_agent.db.models import Instance, InstanceAction
from compute_agent.states import PowerState
from compute_agent.utils import utcnow
from compute_agent.virt.libvirt.driver import power_state
from tests import nodefile
from tests.functional import qemu
from tests.functional.agent_process import REPO, AgentProcess, manage
from tests.helpers import eventually

T = TypeVar("T")

HOST = "kill-host"
BUILDS = 12
BUILD_LIMIT = 2
SYNC_DOMAINS = 3000
SYNC_UNCLAIMED = 5
# The test driver's states the mid-sync host is made of; every row starts
# as "nostate", so the sync writes each one (and stops no domain).
SYNC_STATES = (PowerState.RUNNING, PowerState.PAUSED, PowerState.SHUTDOWN)


def poll(fn: Callable[[], T | None], timeout: float, what: str, every: float = 0.1) -> T:
    """Call ``fn`` until it returns something truthy, for at most ``timeout`` s."""
    return eventually(fn, timeout, what, every=every)


class Node:
    """One agent configuration and database, run as successive processes."""

    def __init__(self, root: pathlib.Path, options: str) -> None:
        conf = root / "kill.conf"
        conf.write_text(
            f"[DEFAULT]\nstate_path = {root}/state\nhost = {HOST}\nreport_interval = 1\n"
            f"periodic_fuzzy_delay = 0\n{options}"
        )
        self.files = [REPO / "etc" / "compute-agent.conf", conf]
        self.db = Database(f"sqlite:///{root}/state/compute-agent.sqlite")
        self.admin = AdminClient(str(root / "state" / "admin.sock"), timeout=60)
        self.proc: AgentProcess | None = None
        synced = manage("db", "sync", config_files=self.files)
        assert synced.returncode == 0, synced.stderr

    def start(self) -> AgentProcess:
        self.proc = AgentProcess(self.files)
        self.proc.wait_for("admin socket listening")
        return self.proc

    def kill9(self) -> float:
        """SIGKILL the agent; when it was sent."""
        assert self.proc is not None
        self.proc.proc.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        assert self.proc.wait_exit(10) == -signal.SIGKILL
        return killed_at

    def stop(self) -> None:
        if self.proc is not None and self.proc.proc.poll() is None:
            rc, _ = self.proc.terminate(timeout=20)
            assert rc == 0, self.proc.output

    def call(self, method: str, **args: Any) -> Any:
        return self.admin.call(method, args)

    def rows(self) -> dict[str, Instance]:
        """Every instance row of the host, soft-deleted ones included."""
        with self.db.transaction() as session:
            found = session.scalars(sa.select(Instance).where(Instance.host == HOST)).all()
        return {i.uuid: i for i in found}

    def power_sync(self) -> dict[str, Any]:
        """One forced sync through the CLI, as an operator runs it."""
        done = manage("power-sync", "-f", "json", config_files=self.files)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)


@pytest.fixture
def cleanup() -> Iterator[list[Node]]:
    """Nodes registered here are stopped (or killed) when the test ends."""
    nodes: list[Node] = []
    yield nodes
    for node in nodes:
        if node.proc is not None:
            node.proc.kill()
        node.db.dispose()


def hypervisor_view(conn: libvirt.virConnect, prefix: str) -> dict[str, tuple[str, PowerState]]:
    """name -> (uuid, power state) of every domain whose name starts with ``prefix``."""
    return {
        d.name(): (d.UUIDString().lower(), power_state(d.state()[0]))
        for d in conn.listAllDomains()
        if d.name().startswith(prefix)
    }


def assert_db_matches(rows: dict[str, Instance], view: dict[str, tuple[str, PowerState]]) -> None:
    """Every live row: no task, and the power state its domain (or its absence) shows."""
    for inst in rows.values():
        if inst.deleted:
            continue
        assert inst.task_state is None, (inst.uuid, inst.task_state)
        found = view.get(inst.domain_name)
        want = PowerState.NOSTATE if found is None else found[1]
        assert found is None or found[0] == inst.uuid, (inst.uuid, found)
        assert inst.power_state == want.value, (inst.uuid, inst.vm_state, inst.power_state, want)


def test_killed_mid_builds_restart_settles_every_build(tmp_path, cleanup) -> None:
    with qemu.guests() as prefix:
        node = Node(
            tmp_path,
            f"[compute]\ninstance_name_template = {qemu.name_template(prefix)}\n"
            f"max_concurrent_builds = {BUILD_LIMIT}\nstats_interval = 0\n"
            f"[libvirt]\nconnection_uri = {qemu.QEMU_URI}\nvirt_type = qemu\n",
        )
        cleanup.append(node)
        node.start()
        conn = qemu.open_system()
        try:
            _kill_mid_builds(node, conn, prefix)
        finally:
            conn.close()
            node.stop()


def _kill_mid_builds(node: Node, conn: libvirt.virConnect, prefix: str) -> None:
    uuids = [str(uuidlib.uuid4()) for _ in range(BUILDS)]
    replies: dict[str, Any] = {}

    def build(uid: str) -> None:
        payload = {"uuid": uid, "name": f"kill-{uid[:8]}", "vcpus": 1, "memory_mb": 64}
        try:
            replies[uid] = node.call("build_instance", instance=payload)
        except (ClientError, AgentUnreachable) as exc:
            replies[uid] = exc  # the agent died before answering

    pool = concurrent.futures.ThreadPoolExecutor(BUILDS)
    for uid in uuids:
        pool.submit(build, uid)

    def in_flight() -> Counter | None:
        tasks = Counter(i.task_state for i in node.rows().values())
        # Some built, some spawning, some still waiting for a slot.
        ready = tasks[None] >= 1 and tasks["spawning"] >= 1 and tasks["queued"] >= 1
        return tasks if ready else None

    poll(in_flight, 30, "builds in flight")
    node.kill9()
    pool.shutdown(wait=True)
    left = node.rows()  # as the killed agent left them: nothing writes now
    at_kill = Counter(i.task_state for i in left.values())
    interrupted = {u for u, i in left.items() if i.task_state is not None}
    domains_at_kill = hypervisor_view(conn, prefix)
    accepted = {u for u, r in replies.items() if isinstance(r, dict)}

    restarted = node.start()
    settled = poll(
        lambda: (rows := node.rows()) and all(i.task_state is None for i in rows.values()) and rows,
        30,
        "start-up recovery settles every row",
    )
    summary = node.power_sync()
    rows = node.rows()
    view = hypervisor_view(conn, prefix)

    # No row lost: a build the agent answered has its row; no row is a stranger.
    assert set(rows) <= set(uuids)
    assert accepted <= set(rows)
    assert len(settled) == len(rows)
    for uid in accepted:
        assert rows[uid].vm_state == "active", rows[uid].vm_state
    # Every domain of the prefix is claimed by a row (name and UUID) or listed unknown.
    claimed = {(i.domain_name, i.uuid) for i in rows.values() if not i.deleted}
    for name, (uid, _) in view.items():
        assert (name, uid) in claimed or name in summary["unknown_domains"], (name, summary)
    assert summary["aborted"] is None and summary["errors"] == 0, summary
    assert_db_matches(rows, view)
    for inst in rows.values():
        assert inst.vm_state in ("active", "error"), (inst.uuid, inst.vm_state)
        # Active exactly when its domain runs; an error row left no domain behind.
        assert (inst.vm_state == "active") == (inst.domain_name in view), inst.uuid
    # Recovery, not the sync, settled each interrupted build, and said so.
    recovered = _recovered(node)
    assert recovered == interrupted, (recovered, interrupted)
    assert f"start-up recovery: {len(interrupted)} interrupted operation(s)" in restarted.output
    print(
        f"\nat the kill: rows by task_state {dict(at_kill)}, domains "
        f"{dict(Counter(str(p) for _, p in domains_at_kill.values()))}, "
        f"{len(accepted)} replies; after recovery: "
        f"{dict(Counter(i.vm_state for i in rows.values()))}, {len(view)} domains, "
        f"forced sync changed {summary['changed']}, unknown {summary['unknown_domains']}"
    )


def test_killed_mid_sync_restart_loses_no_row(tmp_path, cleanup) -> None:
    prefix = "kill-sync-"
    domains = [
        nodefile.TestDomain(f"{prefix}{u}", u, SYNC_STATES[i % len(SYNC_STATES)])
        for i, u in enumerate(str(uuidlib.uuid4()) for _ in range(SYNC_DOMAINS))
    ]
    unclaimed = [
        nodefile.TestDomain(f"{prefix}stray-{i}", str(uuidlib.uuid4()))
        for i in range(SYNC_UNCLAIMED)
    ]
    uri = nodefile.write(str(tmp_path / "node.xml"), domains + unclaimed)
    daemon_uri = uri.replace("test://", "test+unix://", 1)
    node = Node(
        tmp_path,
        # The sync runs at start: what is killed is the agent's own first sync.
        f"[compute]\ninstance_name_template = {prefix}%(uuid)s\nstats_interval = 0\n"
        # No steady-state delay: shut-off domains count at once, so the forced
        # sync right after the restart finds everything in line (issue 12).
        f"handle_lifecycle_events = false\n[libvirt]\nconnection_uri = {daemon_uri}\n"
        "lifecycle_event_delay = 0\n",
    )
    cleanup.append(node)
    now = utcnow()
    with node.db.engine.begin() as conn:
        conn.execute(
            sa.insert(Instance),
            [
                dict(
                    uuid=d.uuid, host=HOST, display_name=d.name, domain_name=d.name,
                    vm_state="active", task_state=None, power_state="nostate",
                    vcpus=1, memory_mb=64, created_at=now, updated_at=now, deleted=False,
                )
                for d in domains
            ],
        )  # fmt: skip
    before = set(node.rows())
    assert len(before) == SYNC_DOMAINS

    node.start()

    def mid_sync() -> dict[str, Any] | None:
        status = node.call("status")
        done, total = status["power_sync_progress"]
        written = SYNC_DOMAINS - status["host_state"]["instances_by_power_state"]["nostate"]
        # At least one batch committed, and the sync still far from its end.
        return status if written >= 100 and 0 < done < total * 0.7 else None

    status = poll(mid_sync, 60, "a sync half-way with writes committed", every=0.05)
    node.kill9()
    progress = status["power_sync_progress"]
    rows = node.rows()
    written_before = sum(i.power_state != "nostate" for i in rows.values())
    audited = _count(node, InstanceAction)
    assert set(rows) == before  # the kill lost none
    # Each batch commits its audit rows with its writes: none lost to the kill.
    assert written_before > 0 and audited >= written_before, (written_before, audited)

    restarted = node.start()
    # The restarted agent's own first sync finishes the job, then one forced sync.
    restarted.wait_for("power sync of", timeout=60)
    summary = node.power_sync()
    rows = node.rows()
    view_conn = libvirt.open(daemon_uri)  # a fresh copy of the node file's state
    try:
        view = hypervisor_view(view_conn, prefix)
    finally:
        view_conn.close()

    assert set(rows) == before  # no row lost, none added
    assert_db_matches(rows, view)
    assert summary["changed"] == 0 and summary["errors"] == 0, summary  # already in line
    assert summary["checked"] == SYNC_DOMAINS, summary
    assert sorted(summary["unknown_domains"]) == sorted(d.name for d in unclaimed)
    stopped = sum(i.vm_state == "stopped" for i in rows.values())
    assert stopped == sum(d.state is PowerState.SHUTDOWN for d in domains)
    print(
        f"\nkilled at sync progress {progress}: {written_before} rows written, {audited} audit "
        f"rows; after restart: first sync '{_line(restarted.output, 'power sync of')}', forced "
        f"sync {summary['duration_s']} s changed {summary['changed']}"
    )


def _recovered(node: Node) -> set[str]:
    """The instances start-up recovery wrote an audit row for."""
    query = sa.select(InstanceAction.instance_uuid).where(
        InstanceAction.action == "recover", InstanceAction.source == "startup"
    )
    with node.db.engine.connect() as conn:
        return set(conn.execute(query).scalars())


def _count(node: Node, model: type) -> int:
    with node.db.engine.connect() as conn:
        return conn.execute(sa.select(sa.func.count()).select_from(model)).scalar_one()


def _line(output: str, needle: str) -> str:
    return next((line.split("] ", 1)[-1] for line in output.splitlines() if needle in line), "")
