"""The agent with real QEMU guests: a subprocess on qemu:///system, PostgreSQL and RabbitMQ.

The test is the scheduler (``rpcapi.ComputeAPI`` over the real broker) and
the operator (``compute-agent-manage``); it checks every outcome twice, on
its own libvirt connection and in the database. The agent names its
domains with the module's prefix, so the test touches no other guest and
removes all of its own when it ends, failed or not.

The periodic sync runs every 600 s, so a change made behind the agent's
back can only reach the database through a lifecycle event, and a
discrepancy no event can explain only through a forced sync.
"""

from __future__ import annotations

import contextlib
import json
import pathlib
import signal
import threading
import time
import uuid as uuidlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import libvirt
import pytest
import sqlalchemy as sa

from compute_agent import exception
from compute_agent.admin.client import AdminClient
from compute_agent.db.api import Database
from compute_agent.db.models import Instance
from compute_agent.rpcapi import ComputeAPI
from tests.functional import qemu
from tests.functional.agent_process import AgentProcess, manage
from tests.functional.rabbit import RabbitRun
from tests.helpers import eventually

GUESTS = 20
MEMORY_MB = 64
EVENT_DELAY_S = 1  # [libvirt] lifecycle_event_delay
SYNC_INTERVAL_S = 600  # long: only events and forced syncs can explain a change
EVENT_BOUND_S = 10  # how long an event may take to reach the database here
SHUTDOWN_TIMEOUT_S = 1  # a diskless guest ignores ACPI: the stop is forced after this


@dataclass
class Env:
    prefix: str
    host: str
    api: ComputeAPI
    db: Database
    conn: libvirt.virConnect
    agent: AgentProcess
    config_files: list[pathlib.Path]
    admin: AdminClient

    def name(self, uuid: str) -> str:
        return f"{self.prefix}{uuid}"

    def dom(self, uuid: str) -> libvirt.virDomain:
        return self.conn.lookupByUUIDString(uuid)

    def row(self, uuid: str) -> Instance:
        return self.db.instance_get(uuid)

    def raw_row(self, uuid: str) -> sa.Row:
        """The row as stored, soft-deleted or not."""
        with self.db.engine.connect() as c:
            return c.execute(
                sa.select(Instance.__table__).where(Instance.__table__.c.uuid == uuid)
            ).one()

    def status(self) -> dict[str, Any]:
        """The agent's status, over its admin socket (what ``status -f json`` prints)."""
        return self.admin.call("status")

    def task_runs(self, name: str) -> int:
        tasks = {t["name"]: t for t in self.status()["periodic_tasks"]}
        return tasks[name]["runs"]


def _write_conf(path: pathlib.Path, host: str, prefix: str, db_url: str) -> None:
    path.write_text(
        f"[DEFAULT]\nhost = {host}\nstate_path = {path.parent}/state\n"
        "report_interval = 1\nperiodic_fuzzy_delay = 0\n"
        "[compute]\n"
        f"instance_name_template = {qemu.name_template(prefix)}\n"
        f"sync_power_state_interval = {SYNC_INTERVAL_S}\n"
        "stats_interval = 1\n"
        f"shutdown_timeout = {SHUTDOWN_TIMEOUT_S}\n"
        "power_sync_action = enforce\n"
        "[libvirt]\nconnection_uri = qemu:///system\nvirt_type = qemu\n"
        f"lifecycle_event_delay = {EVENT_DELAY_S}\n"
        f"[database]\nconnection = {db_url}\n"
    )


@pytest.fixture(scope="module")
def env(db_url_factory, tmp_path_factory) -> Iterator[Env]:
    """One agent on qemu:///system with 20 guests built through RPC; all removed after."""
    conn = qemu.open_system()
    prefix = qemu.new_prefix()
    run = RabbitRun()
    db_url = db_url_factory("postgresql")
    root = tmp_path_factory.mktemp("qemu-guests")
    rabbit_conf = root / "rabbit.conf"
    rabbit_conf.write_text(run.conf_text())
    conf = root / "agent.conf"
    host = run.host("qemu")
    _write_conf(conf, host, prefix, db_url)
    files = [rabbit_conf, conf]
    db = Database(db_url)
    agent: AgentProcess | None = None
    api: ComputeAPI | None = None
    try:
        synced = manage("db", "sync", config_files=files)
        assert synced.returncode == 0, synced.stderr
        agent = AgentProcess(files)
        agent.wait_for("RPC serving")
        api = ComputeAPI(run.conf(), timeout=60)
        admin = AdminClient(str(root / "state" / "admin.sock"), timeout=30)
        yield Env(prefix, host, api, db, conn, agent, files, admin)
        agent.proc.send_signal(signal.SIGTERM)
        assert agent.wait_exit(15) == 0, agent.output
        assert "Traceback" not in agent.output, agent.output
    finally:
        if agent is not None:
            agent.kill()
            (root / "agent.log").write_text(agent.output)  # for a failure's post-mortem
        if api is not None:
            api.close()
        with contextlib.suppress(libvirt.libvirtError):
            conn.close()
        qemu.remove_domains(prefix)
        run.cleanup()
        db.dispose()
        check = qemu.open_system()  # a fresh connection: the daemon may have restarted
        try:
            left = [d.name() for d in check.listAllDomains() if d.name().startswith(prefix)]
        finally:
            check.close()
        assert left == [], f"domains left behind: {left}"


@pytest.fixture(scope="module")
def fleet(env) -> list[str]:
    """GUESTS instances built at once through RPC, through the agent's build slots."""
    uuids = [str(uuidlib.uuid4()) for _ in range(GUESTS)]
    results: dict[str, Any] = {}

    def build(uuid: str) -> None:
        try:
            results[uuid] = env.api.build_instance(
                env.host,
                {"uuid": uuid, "name": f"g-{uuid[:8]}", "vcpus": 1, "memory_mb": MEMORY_MB},
            )
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            results[uuid] = exc

    threads = [threading.Thread(target=build, args=(u,)) for u in uuids]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    failed = {u: r for u, r in results.items() if not isinstance(r, dict)}
    assert len(results) == GUESTS and not failed, failed
    return uuids


def assert_running(env: Env, uuid: str) -> None:
    """Running on the hypervisor under the agent's name, and recorded as such."""
    dom = env.dom(uuid)
    assert dom.isActive() and dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING, uuid
    assert dom.name() == env.name(uuid)
    row = env.row(uuid)
    assert (row.vm_state, row.power_state, row.task_state) == ("active", "running", None)
    assert row.domain_name == env.name(uuid)


def assert_stopped(env: Env, uuid: str) -> None:
    dom = env.dom(uuid)
    assert not dom.isActive() and dom.state()[0] == libvirt.VIR_DOMAIN_SHUTOFF, uuid
    row = env.row(uuid)
    assert (row.vm_state, row.power_state, row.task_state) == ("stopped", "shutdown", None)


def test_twenty_guests_built_through_the_agent_run_in_qemu(env, fleet):
    ours = {d.UUIDString(): d for d in env.conn.listAllDomains() if d.name().startswith(env.prefix)}
    assert set(ours) == set(fleet)
    for uuid in fleet:
        assert_running(env, uuid)
        dom = ours[uuid]
        assert dom.info()[1] == MEMORY_MB * 1024 and dom.info()[3] == 1  # KiB, vCPUs
        assert qemu.qemu_pid(dom.name()) > 0  # a real QEMU process
    builds = env.status()["builds"]  # through the build slots, none left waiting
    assert builds == {"queued": 0, "running": 0, "completed": GUESTS, "failed": 0}
    listed = {i["uuid"]: i for i in env.api.list_instances(env.host)}
    assert set(listed) == set(fleet)
    assert all(i["power_state"] == "running" for i in listed.values())


def in_parallel(*flows: Callable[[], None]) -> None:
    """Run independent flows at once, as a scheduler would send them; re-raise a failure.

    Each libvirt stop takes about 2 s: one after another, these flows would
    take most of the file's time budget.
    """
    errors: list[BaseException] = []

    def run(flow: Callable[[], None]) -> None:
        try:
            flow()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(f,)) for f in flows]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    if errors:
        raise errors[0]


def test_stop_start_reboot_delete(env, fleet):
    a, b, c = fleet[0], fleet[1], fleet[2]

    def stop_then_start() -> None:
        stopped = env.api.stop_instance(env.host, a)
        assert (stopped["vm_state"], stopped["power_state"]) == ("stopped", "shutdown")
        assert_stopped(env, a)
        with pytest.raises(exception.InstanceInvalidState):
            env.api.stop_instance(env.host, a)  # already stopped: refused, nothing touched
        started = env.api.start_instance(env.host, a)
        assert (started["vm_state"], started["power_state"]) == ("active", "running")
        assert_running(env, a)

    def reboot_soft_then_hard() -> None:
        pid = qemu.qemu_pid(env.name(b))
        assert env.api.reboot_instance(env.host, b)["vm_state"] == "active"
        assert_running(env, b)
        assert qemu.qemu_pid(env.name(b)) == pid  # soft: the same QEMU process
        assert env.api.reboot_instance(env.host, b, hard=True)["vm_state"] == "active"
        assert qemu.qemu_pid(env.name(b)) != pid  # hard: a new QEMU process
        # The hard reboot's STOPPED event is either cancelled by the start's
        # events or, on a loaded host, synced after its delay under the
        # reboot's lock: either way the instance is never recorded stopped.
        time.sleep(EVENT_DELAY_S + 2)
        assert_running(env, b)
        assert not any(f"instance {b}: vm_state active -> stopped" in x for x in env.agent.lines)

    def delete() -> None:
        deleted = env.api.delete_instance(env.host, c)
        assert deleted["vm_state"] == "deleted"
        with pytest.raises(libvirt.libvirtError):
            env.dom(c)  # undefined
        row = env.raw_row(c)
        assert row.deleted and row.deleted_at is not None and row.vm_state == "deleted"
        with pytest.raises(exception.InstanceNotFound):
            env.api.get_instance_info(env.host, c)

    in_parallel(stop_then_start, reboot_soft_then_hard, delete)
    fleet.remove(c)


def test_out_of_band_changes_reach_the_database_through_events(env, fleet):
    a, b = fleet[3], fleet[4]
    runs = env.task_runs("power_sync")

    def wait_row(uuid: str, vm_state: str, power_state: str, what: str, bound: float) -> None:
        """Wait at most ``bound`` seconds for the row to show the states."""
        eventually(
            lambda: (env.row(uuid).vm_state, env.row(uuid).power_state) == (vm_state, power_state),
            bound,
            what,
            detail=lambda: (env.row(uuid).vm_state, env.row(uuid).power_state),
        )

    env.dom(a).suspend()
    wait_row(a, "active", "paused", "suspend", EVENT_BOUND_S)
    env.dom(a).resume()
    wait_row(a, "active", "running", "resume", EVENT_BOUND_S)

    before = time.monotonic()
    env.dom(b).destroy()  # STOPPED: waits out the event delay, then syncs
    wait_row(b, "stopped", "shutdown", "destroy", EVENT_DELAY_S + EVENT_BOUND_S)
    assert time.monotonic() - before >= EVENT_DELAY_S  # held back: it could have been a reboot
    assert not env.dom(b).isActive()

    # Started behind the back of an agent that enforces: the event has it stopped again.
    env.dom(b).create()
    eventually(
        lambda: not env.dom(b).isActive(),
        SHUTDOWN_TIMEOUT_S + EVENT_BOUND_S,
        "out-of-band start undone",
    )
    wait_row(b, "stopped", "shutdown", "stopped after enforcement", EVENT_BOUND_S)
    env.agent.wait_for(f"instance {b} is stopped in the database but running", 5)
    # Only events explain all this: the periodic sync did not run meanwhile.
    assert env.task_runs("power_sync") == runs
    fleet.remove(b)  # stopped for good; leave it out of the running set


def test_forced_sync_corrects_what_no_event_explains(env, fleet):
    uuid = fleet[5]
    with env.db.engine.begin() as c:  # a wrong value, written behind the agent's back
        c.execute(
            sa.update(Instance.__table__)
            .where(Instance.__table__.c.uuid == uuid)
            .values(power_state="shutdown")
        )
    assert env.row(uuid).power_state == "shutdown"

    done = manage("power-sync", "-f", "json", config_files=env.config_files)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["changed"] == 1 and summary["errors"] == 0 and summary["aborted"] is None
    assert summary["checked"] == len(env.api.list_instances(env.host))
    assert_running(env, uuid)
    assert env.dom(uuid).isActive()  # the domain itself was left as it was


def test_real_statistics_of_running_guests(env, fleet):
    watched = fleet[6:9]

    def sample(uuid: str) -> dict[str, Any] | None:
        return env.api.get_instance_stats(env.host, uuid)["stats"]

    first = {u: eventually(lambda u=u: sample(u), 10, f"first sample of {u}") for u in watched}
    for uuid, stats in first.items():
        assert stats["uuid"] == uuid and stats["name"] == env.name(uuid)
        assert stats["state"] == "running" and stats["vcpus"] == 1
        assert stats["memory_max_kb"] == MEMORY_MB * 1024
        assert stats["memory_kb"] == MEMORY_MB * 1024  # balloon: all of it
        assert stats["memory_rss_kb"] > 1024  # a real QEMU process's resident memory
        assert stats["cpu_time_ns"] > 0
    # A later cycle: more CPU time (an idle guest's vCPU still takes its timer ticks).
    for uuid, stats in first.items():
        eventually(
            lambda u=uuid, s=stats: (sample(u) or {}).get("cpu_time_ns", 0) > s["cpu_time_ns"],
            10,
            f"cpu time of {uuid} increasing",
        )
    cli = manage("instances", "stats", watched[0], "-f", "json", config_files=env.config_files)
    assert cli.returncode == 0, cli.stderr
    shown = json.loads(cli.stdout)
    # Sampled every second; a loaded 2-CPU host may stretch a cycle to seconds.
    assert shown["stats"]["memory_max_kb"] == MEMORY_MB * 1024 and 0 <= shown["age_s"] < 30
    assert shown["unresponsive"] is False
