"""The agent through outages of what it depends on: libvirtd, RabbitMQ, PostgreSQL.

Each test runs the real agent as a process against the machine's real
services, takes one of them away the way a host loses it (SIGKILL for the
daemon, a full broker stop, a fast database shutdown), brings it back, and
checks what an operator relies on: the agent kept serving, kept its
schedule, lost no instance row, left none stuck in a task, and caught up
on its own. The services are always restarted in a ``finally``.
"""

from __future__ import annotations

import os
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
from compute_agent.admin.client import AdminClient, RemoteError
from compute_agent.db import migration
from compute_agent.db.api import Database
from compute_agent.db.models import Instance, Service
from compute_agent.rpcapi import ComputeAPI
from compute_agent.service import BINARY
from compute_agent.states import PowerState
from compute_agent.utils import utcnow
from compute_agent.virt.libvirt.driver import power_state
from tests import helpers, nodefile
from tests.functional import qemu, services
from tests.functional.agent_process import REPO, AgentProcess
from tests.functional.rabbit import RabbitRun

pytestmark = pytest.mark.timeout(240)


@dataclass
class Agent:
    """A running agent, its database and its admin socket."""

    host: str
    proc: AgentProcess
    db: Database
    admin: AdminClient

    def status(self) -> dict[str, Any]:
        return self.admin.call("status")

    def task(self, name: str, status: dict[str, Any] | None = None) -> dict[str, Any]:
        tasks = (status or self.status())["periodic_tasks"]
        return next(t for t in tasks if t["name"] == name)

    def service_row(self) -> Service:
        row = self.db.service_get(self.host, BINARY)
        assert row is not None
        return row

    def rows(self) -> list[Instance]:
        with self.db.transaction() as s:
            return list(s.scalars(sa.select(Instance).where(Instance.host == self.host)))


def eventually(check: Callable[[], Any], what: str, timeout: float = 30) -> Any:
    """Poll ``check`` until truthy; exceptions count as not yet (polling through an outage)."""
    return helpers.eventually(check, timeout, what, every=0.1, tolerate=(Exception,))


@pytest.fixture
def start_agent(tmp_path) -> Iterator[Callable[..., Agent]]:
    """Start the real agent on a config of its own; stopped with SIGTERM afterwards."""
    started: list[Agent] = []

    def start(db_url: str, conf: str, *, host: str | None = None, extra_files: tuple = ()) -> Agent:
        host = host or f"faults-{uuidlib.uuid4().hex[:8]}"
        path = tmp_path / f"{host}.conf"
        path.write_text(
            f"[DEFAULT]\nhost = {host}\nstate_path = {tmp_path}/{host}\nreport_interval = 1\n"
            f"periodic_fuzzy_delay = 0\ngraceful_shutdown_timeout = 5\n"
            f"[database]\nconnection = {db_url}\n{conf}"
        )
        db = Database(db_url)
        migration.upgrade(db)
        proc = AgentProcess([REPO / "etc" / "compute-agent.conf", *extra_files, path])
        agent = Agent(host, proc, db, AdminClient(f"{tmp_path}/{host}/admin.sock", timeout=120))
        started.append(agent)
        proc.wait_for("admin socket listening", timeout=60)
        return agent

    yield start
    for agent in started:
        try:
            if agent.proc.proc.poll() is None:
                rc, _ = agent.proc.terminate(timeout=30)
                assert rc == 0, agent.proc.output[-5000:]
        finally:
            agent.proc.kill()
            agent.db.dispose()


def build(agent: Agent, count: int) -> list[str]:
    uuids = [str(uuidlib.uuid4()) for _ in range(count)]
    for uid in uuids:
        agent.admin.call(
            "build_instance",
            {"instance": {"uuid": uid, "name": f"vm-{uid[:6]}", "vcpus": 1, "memory_mb": 64}},
        )
    return uuids


def assert_rows_settled(agent: Agent, expected: int) -> None:
    """No row lost, none deleted, none left in a task."""
    rows = agent.rows()
    assert len(rows) == expected
    assert [r.uuid for r in rows if r.deleted] == []
    assert [(r.uuid, r.task_state) for r in rows if r.task_state is not None] == []


# -- PostgreSQL ----------------------------------------------------------------


def test_postgresql_restart_tasks_log_the_outage_keep_their_schedule_and_write_again(
    start_agent, db_url_factory
):
    agent = start_agent(
        db_url_factory("postgresql"),
        "[compute]\nsync_power_state_interval = 2\nstats_interval = 1\n",
    )
    uuids = build(agent, 10)
    eventually(lambda: agent.task("heartbeat")["runs"] >= 2, "two heartbeats")
    before = agent.service_row().report_count

    services.stop_postgresql()
    down_at = time.monotonic()
    try:
        # Every task that needs the database fails, and says so, while the
        # agent goes on answering its operator.
        eventually(
            lambda: (
                agent.task("heartbeat")["failures"] >= 3
                and agent.task("power_sync")["failures"] >= 1
            ),
            "heartbeat and power_sync failing",
            timeout=20,
        )
        during = agent.status()
        assert agent.admin.call("ping")["host"] == agent.host
        assert "database" in during["host_state"]["error"]
        beat = agent.task("heartbeat", during)
        assert beat["last_error"] and beat["next_run_in_s"] is not None
        with pytest.raises(RemoteError) as refused:
            agent.admin.call("stop_instance", {"instance_uuid": uuids[0]})
        assert refused.value.type == "DatabaseUnavailable"
        assert "database" in str(refused.value).lower()
    finally:
        outage = time.monotonic() - down_at
        services.start_postgresql()
    up_at = time.monotonic()

    # Writes resume on the heartbeat's own schedule, with no restart.
    eventually(lambda: agent.service_row().report_count > before, "a heartbeat written")
    written_after = time.monotonic() - up_at
    eventually(
        lambda: (t := agent.task("power_sync"))["last_error"] is None and t["runs"] >= 2,
        "a power sync that succeeds",
        timeout=20,
    )
    status = agent.status()
    beat = agent.task("heartbeat", status)
    # One run a second throughout, the outage included: no task stalled.
    assert beat["runs"] >= int(outage) + 1, (beat, outage)
    assert beat["max_lateness_s"] < 1.0, beat
    assert status["host_state"]["service"]["up"] is True
    assert_rows_settled(agent, 10)
    assert {r.power_state for r in agent.rows()} == {"running"}

    log = agent.proc.output
    assert "periodic task heartbeat failed:" in log
    assert "periodic task heartbeat failed again" in log
    assert "periodic task heartbeat recovered after" in log
    # A typed outage is one line per failure, never a traceback.
    assert "Traceback" not in log, log[-4000:]
    assert "DatabaseUnavailable: database unavailable" in log
    print(
        f"\nPostgreSQL down {outage:.1f} s: heartbeat failures {beat['failures']}, "
        f"max lateness {beat['max_lateness_s']} s, first heartbeat written "
        f"{written_after:.1f} s after the database was up"
    )


# -- RabbitMQ ------------------------------------------------------------------


@pytest.fixture
def rabbit() -> Iterator[RabbitRun]:
    run = RabbitRun()
    yield run
    services.start_rabbitmq()
    run.cleanup()


def test_rabbitmq_restart_rpc_works_again_without_restarting_the_agent(
    start_agent, rabbit, tmp_path
):
    rabbit_conf = tmp_path / "rabbit.conf"
    rabbit_conf.write_text(rabbit.conf_text())
    agent = start_agent(
        f"sqlite:///{tmp_path}/rabbit-agent.sqlite",
        "[compute]\nstats_interval = -1\n",
        host=rabbit.host("faults"),
        extra_files=(rabbit_conf,),
    )
    agent.proc.wait_for("RPC serving")
    # The scheduler's client lives through the outage too, as a real one would.
    api = ComputeAPI(rabbit.conf(), timeout=10)
    try:
        assert api.ping(agent.host)["host"] == agent.host
        first = str(uuidlib.uuid4())
        api.build_instance(
            agent.host, {"uuid": first, "name": "before", "vcpus": 1, "memory_mb": 64}
        )
        pid = agent.proc.proc.pid
        beats = agent.service_row().report_count

        stopping, starting = services.restart_rabbitmq()
        up_at = time.monotonic()

        # No restart of the agent: the same process answers again.
        eventually(lambda: api.ping(agent.host)["host"] == agent.host, "an RPC ping", 60)
        answered_after = time.monotonic() - up_at
        assert agent.proc.proc.poll() is None and agent.proc.proc.pid == pid
        second = str(uuidlib.uuid4())
        built = api.build_instance(
            agent.host, {"uuid": second, "name": "after", "vcpus": 1, "memory_mb": 64}
        )
        assert built["vm_state"] == "active" and built["power_state"] == "running"
        assert api.stop_instance(agent.host, first)["power_state"] == "shutdown"
        assert api.get_instance_info(agent.host, first)["vm_state"] == "stopped"
        with pytest.raises(exception.InstanceNotFound):
            api.get_instance_info(agent.host, str(uuidlib.uuid4()))
        # The heartbeat needs no broker and never paused.
        assert agent.service_row().report_count >= beats + int(stopping + starting)
        assert_rows_settled(agent, 2)
    finally:
        api.close()
    assert "Traceback" not in agent.proc.output, agent.proc.output[-4000:]
    print(
        f"\nRabbitMQ stop {stopping:.1f} s + start {starting:.1f} s; "
        f"first RPC answered {answered_after:.1f} s after the broker was up"
    )


# -- libvirtd ------------------------------------------------------------------

HOST_SIZE = 3000


def _node_host(path) -> tuple[str, dict[str, str]]:
    """A host of HOST_SIZE test domains in several states, served by the real daemon."""
    cycle = ["running", "running", "paused", "shutdown"]
    domains = []
    for i in range(HOST_SIZE):
        uid = str(uuidlib.UUID(int=i + 1, version=4))
        domains.append(nodefile.TestDomain(f"instance-{uid}", uid, PowerState(cycle[i % 4])))
    uri = nodefile.write(str(path), domains).replace("test://", "test+unix://", 1)
    return uri, {d.uuid: d.state.value for d in domains}


def _rows(db: Database, host: str, states: dict[str, str], wrong: bool) -> None:
    """One row per domain; with ``wrong``, every power_state disagrees with the domain's."""
    now = utcnow()
    flip = {"running": "shutdown", "paused": "running", "shutdown": "running"}
    rows = [
        dict(
            uuid=uid,
            host=host,
            display_name=None,
            domain_name=f"instance-{uid}",
            vm_state="active" if state != "shutdown" else "stopped",
            task_state=None,
            power_state=flip[state] if wrong else state,
            vcpus=1,
            memory_mb=64,
            created_at=now,
            updated_at=now,
            deleted=False,
        )  # fmt: skip
        for uid, state in states.items()
    ]
    with db.engine.begin() as conn:
        conn.execute(sa.insert(Instance), rows)


def _hypervisor_states(uri: str) -> dict[str, str]:
    conn = libvirt.open(uri)
    try:
        return {d.UUIDString(): power_state(d.state()[0]).value for d in conn.listAllDomains()}
    finally:
        conn.close()


def test_libvirtd_killed_during_a_full_sync_and_restarted(start_agent, tmp_path):
    uri, states = _node_host(tmp_path / "node.xml")
    db_url = f"sqlite:///{tmp_path}/libvirtd-agent.sqlite"
    agent = start_agent(
        db_url,
        f"[libvirt]\nconnection_uri = {uri}\nreconnect_min_delay = 0.2\n"
        "reconnect_max_delay = 1\n"
        "[compute]\nsync_power_state_interval = 600\npower_sync_action = report\n"
        "stats_interval = -1\n",
    )
    # Rows written after start-up, all wrong: the sync has 3000 writes to make.
    eventually(lambda: agent.task("power_sync")["runs"] >= 1, "the start-up sync")
    _rows(agent.db, agent.host, states, wrong=True)

    forced: dict[str, Any] = {}
    caller = threading.Thread(
        target=lambda: forced.update(agent.admin.call("sync_power_states")), daemon=True
    )
    caller.start()
    progress = eventually(
        lambda: (
            (p := agent.status()["power_sync_progress"])[1] == HOST_SIZE
            and 0 < p[0] < HOST_SIZE // 2
            and p
        ),
        "the sync under way",
    )
    beats = agent.service_row().report_count
    killed_at = time.monotonic()
    try:
        services.kill_libvirtd()
        # The agent notices, says why, and disables itself so no build is sent here.
        row = eventually(
            lambda: (r := agent.service_row()).disabled and r,
            "the service AUTO-disabled",
            timeout=20,
        )
        assert row.disabled_reason.startswith("AUTO: hypervisor connection lost")
        caller.join(60)
        assert not caller.is_alive(), "the forced sync never returned"
        assert forced["aborted"].startswith("hypervisor unavailable"), forced
        assert agent.status()["libvirt"]["connected"] is False
        assert agent.admin.call("ping")["host"] == agent.host
        time.sleep(2)  # a real outage lasts: heartbeats must go on meanwhile
    finally:
        restarted_in = services.start_libvirtd()
    up_at = time.monotonic()
    down_s = up_at - killed_at

    eventually(
        lambda: not (r := agent.service_row()).disabled and r.disabled_reason is None,
        "the service enabled again",
        timeout=30,
    )
    back_after = time.monotonic() - up_at
    # A full sync follows the reconnection, and it finishes the aborted one's work.
    eventually(lambda: _db_states(agent) == _hypervisor_states(uri), "the DB matching libvirt", 60)
    matched_after = time.monotonic() - up_at
    status = agent.status()
    beat = agent.task("heartbeat", status)
    assert agent.service_row().report_count >= beats + int(down_s) - 1, (beat, down_s)
    assert beat["failures"] == 0 and beat["max_lateness_s"] < 1.0, beat
    assert status["libvirt"]["connected"] is True
    assert_rows_settled(agent, HOST_SIZE)
    log = agent.proc.output
    assert "hypervisor back" in log and "running a full power sync" in log
    print(
        f"\nkilled libvirtd at {progress[0]}/{progress[1]} of the sync; down {down_s:.1f} s "
        f"(restart {restarted_in:.1f} s); re-enabled {back_after:.1f} s and DB matching "
        f"{matched_after:.1f} s after the daemon was up"
    )


def _db_states(agent: Agent) -> dict[str, str]:
    return {r.uuid: r.power_state for r in agent.rows()}


def test_libvirtd_killed_with_real_guests_a_change_made_meanwhile_is_caught(start_agent, tmp_path):
    """Events cannot report what happens while the daemon is down; the full sync must."""
    with qemu.guests() as prefix:
        agent = start_agent(
            f"sqlite:///{tmp_path}/qemu-agent.sqlite",
            f"[libvirt]\nconnection_uri = {qemu.QEMU_URI}\nvirt_type = qemu\n"
            "reconnect_min_delay = 0.2\nreconnect_max_delay = 1\n"
            "[compute]\nsync_power_state_interval = 600\nstats_interval = -1\n"
            f"instance_name_template = {qemu.name_template(prefix)}\n",
        )
        survivor, victim = build(agent, 2)
        victim_pid = qemu.qemu_pid(f"{prefix}{victim}")
        survivor_pid = qemu.qemu_pid(f"{prefix}{survivor}")
        try:
            services.kill_libvirtd()
            eventually(lambda: agent.service_row().disabled, "the service AUTO-disabled", 20)
            # The guest dies while nobody can tell the agent: its QEMU is killed.
            os.kill(victim_pid, signal.SIGKILL)
        finally:
            services.start_libvirtd()
        eventually(
            lambda: (
                agent.admin.call("get_instance_info", {"instance_uuid": victim})["power_state"]
                == "shutdown"
            ),
            "the dead guest recorded as shut down",
            timeout=30,
        )
        assert not agent.service_row().disabled
        info = agent.admin.call("get_instance_info", {"instance_uuid": survivor})
        assert info["power_state"] == "running" and info["vm_state"] == "active"
        conn = qemu.open_system()
        try:
            # The survivor's QEMU outlived the daemon: the same process still runs it.
            assert conn.lookupByName(f"{prefix}{survivor}").isActive()
            assert qemu.qemu_pid(f"{prefix}{survivor}") == survivor_pid
            assert not conn.lookupByName(f"{prefix}{victim}").isActive()
        finally:
            conn.close()
        assert_rows_settled(agent, 2)
