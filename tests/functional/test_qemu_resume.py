"""Resume after a host boot, with real QEMU guests on qemu:///system.

The agent builds three guests, is stopped, and the guests are destroyed
behind its back (one is undefined too, as a transient domain would be) while
the kernel's boot id, read from a file the test owns, changes: what a host
boot leaves. The agent is started again; the first power sync runs at once
(``periodic_fuzzy_delay = 0``). With ``resume_guests_state_on_host_boot``
the guests run again before that sync could record them stopped; without
it they end up stopped, as before the option existed.
"""

from __future__ import annotations

import contextlib
import pathlib
import signal
import uuid as uuidlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import libvirt
import pytest

from compute_agent.admin.client import AdminClient, AgentUnreachable
from compute_agent.db.api import Database
from tests.functional import qemu
from tests.functional.agent_process import AgentProcess, manage
from tests.helpers import eventually

GUESTS = 3
BOOT_BEFORE = "aaaaaaaa-0000-4000-8000-000000000001"
BOOT_AFTER = "aaaaaaaa-0000-4000-8000-000000000002"


@dataclass
class Host:
    root: pathlib.Path
    prefix: str
    db: Database
    conn: libvirt.virConnect
    files: list[pathlib.Path]
    boot_id: pathlib.Path

    def start_agent(self) -> tuple[AgentProcess, AdminClient]:
        agent = AgentProcess(self.files)
        admin = AdminClient(str(self.root / "state" / "admin.sock"), timeout=60)

        def answers() -> bool:
            with contextlib.suppress(AgentUnreachable):
                admin.call("ping")
                return True
            assert agent.proc.poll() is None, agent.output
            return False

        eventually(answers, 30, "the agent answers on its admin socket")
        return agent, admin

    def dom(self, uuid: str) -> libvirt.virDomain:
        return self.conn.lookupByUUIDString(uuid)


def stop_agent(agent: AgentProcess) -> None:
    agent.proc.send_signal(signal.SIGTERM)
    assert agent.wait_exit(20) == 0, agent.output
    assert "Traceback" not in agent.output, agent.output


def write_conf(path: pathlib.Path, prefix: str, db_url: str, boot_id: pathlib.Path, on: bool):
    path.write_text(
        f"[DEFAULT]\nhost = resume-{prefix.rstrip('-')}\nstate_path = {path.parent}/state\n"
        "report_interval = 1\nperiodic_fuzzy_delay = 0\n"
        "[compute]\n"
        f"instance_name_template = {qemu.name_template(prefix)}\n"
        "sync_power_state_interval = 600\nstats_interval = 0\nshutdown_timeout = 1\n"
        f"resume_guests_state_on_host_boot = {'true' if on else 'false'}\n"
        f"host_boot_id_path = {boot_id}\n"
        "max_concurrent_builds = 2\n"
        "[libvirt]\nconnection_uri = qemu:///system\nvirt_type = qemu\n"
        "lifecycle_event_delay = 1\n"
        f"[database]\nconnection = {db_url}\n"
    )


@pytest.fixture(params=[True, False], ids=["option-on", "option-off"])
def host(request, db_url_factory, tmp_path) -> Iterator[Host]:
    conn = qemu.open_system()
    prefix = qemu.new_prefix()
    db_url = db_url_factory("postgresql")
    boot_id = tmp_path / "boot_id_of_the_kernel"
    boot_id.write_text(BOOT_BEFORE + "\n")
    conf = tmp_path / "agent.conf"
    write_conf(conf, prefix, db_url, boot_id, request.param)
    db = Database(db_url)
    try:
        synced = manage("db", "sync", config_files=[conf])
        assert synced.returncode == 0, synced.stderr
        yield Host(tmp_path, prefix, db, conn, [conf], boot_id)
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            conn.close()
        qemu.remove_domains(prefix)
        db.dispose()


def build_then_host_boot(host: Host, undefine_one: bool) -> list[str]:
    """Three guests built by the agent; the agent stopped; then a simulated host boot."""
    agent, admin = host.start_agent()
    uuids = [str(uuidlib.uuid4()) for _ in range(GUESTS)]
    try:
        for uuid in uuids:
            spec = {"uuid": uuid, "name": f"r-{uuid[:8]}", "vcpus": 1, "memory_mb": 64}
            built = admin.call("build_instance", {"instance": spec})
            assert (built["vm_state"], built["power_state"]) == ("active", "running")
    finally:
        stop_agent(agent)
        host.root.joinpath("agent-before.log").write_text(agent.output)
    for uuid in uuids:  # the host goes down: every QEMU process ends
        host.dom(uuid).destroy()
    if undefine_one:
        host.dom(uuids[0]).undefine()  # its domain is gone: re-created from the row
    host.boot_id.write_text(BOOT_AFTER + "\n")
    return uuids


def row(host: Host, uuid: str) -> tuple[str, str, Any]:
    r = host.db.instance_get(uuid)
    return (r.vm_state, r.power_state, r.task_state)


def test_guests_that_ran_before_a_host_boot(host: Host):
    on = "resume_guests_state_on_host_boot = true" in host.files[0].read_text()
    uuids = build_then_host_boot(host, undefine_one=on)
    agent, admin = host.start_agent()
    try:

        def synced() -> bool:
            tasks = {t["name"]: t for t in admin.call("status")["periodic_tasks"]}
            return tasks["power_sync"]["runs"] >= 1

        eventually(synced, 60, "the first power sync ran")
        resume = admin.call("status")["resume"]
        assert resume["was_boot"] is True, resume
        if on:
            assert resume["state"] == "done", resume
            assert (resume["resumed"], resume["failed"]) == (GUESTS, 0), resume
            for uuid in uuids:
                dom = host.dom(uuid)
                assert dom.isActive() and dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING, uuid
                assert qemu.qemu_pid(dom.name()) > 0
                assert row(host, uuid) == ("active", "running", None), uuid
                audit = [(a.action, a.source, a.reason or "") for a in host.db.actions_get(uuid)]
                mine = [a for a in audit if a[0] == "resume"]
                assert mine and all(a[1] == "startup" for a in mine), audit
                assert any("host boot" in a[2] for a in mine), audit
            first = [a.reason or "" for a in host.db.actions_get(uuids[0])]
            assert any("re-created" in r for r in first), first
        else:
            assert resume["state"] == "off" and resume["resumed"] == 0, resume
            for uuid in uuids:  # the rule's steady re-read after the 1 s delay
                eventually(
                    lambda u=uuid: row(host, u) == ("stopped", "shutdown", None),
                    20,
                    f"{uuid} recorded stopped",
                )
                assert not host.dom(uuid).isActive()
    finally:
        stop_agent(agent)
        host.root.joinpath("agent-after.log").write_text(agent.output)
    # The new boot id was recorded: the next start is an agent restart, not a boot.
    assert (host.root / "state" / "boot_id").read_text().strip() == BOOT_AFTER


@pytest.mark.parametrize("host", [True], indirect=True, ids=["option-on"])
def test_an_agent_killed_mid_pass_resumes_the_rest_at_its_next_start(host: Host):
    """SIGKILL as the pass starts its first guest (one at a time): the boot id is not
    recorded, the next start's recovery keeps the cut guest active, and every guest runs."""
    host.files[0].write_text(
        host.files[0].read_text().replace("max_concurrent_builds = 2", "max_concurrent_builds = 1")
    )
    uuids = build_then_host_boot(host, undefine_one=True)
    agent = AgentProcess(host.files)
    try:

        def resuming() -> bool:
            assert agent.proc.poll() is None, agent.output
            return any(row(host, u)[2] == "powering-on" for u in uuids)

        eventually(resuming, 60, "a guest is being resumed", every=0.01)
        agent.proc.send_signal(signal.SIGKILL)
        agent.wait_exit(10)
    finally:
        agent.kill()
        host.root.joinpath("agent-killed.log").write_text(agent.output)
    assert (host.root / "state" / "boot_id").read_text().strip() == BOOT_BEFORE
    cut = [u for u in uuids if row(host, u)[2] == "powering-on"]
    assert len(cut) == 1, [row(host, u) for u in uuids]
    agent, admin = host.start_agent()
    try:
        eventually(lambda: admin.call("status")["resume"]["state"] == "done", 60, "pass done")
        for uuid in uuids:
            eventually(lambda u=uuid: row(host, u) == ("active", "running", None), 20, uuid)
            assert host.dom(uuid).state()[0] == libvirt.VIR_DOMAIN_RUNNING, uuid
        # Settled by the recovery (kept active whether its QEMU had started or not).
        assert any(a.action == "recover" for a in host.db.actions_get(cut[0]))
    finally:
        stop_agent(agent)
        host.root.joinpath("agent-after.log").write_text(agent.output)
    assert (host.root / "state" / "boot_id").read_text().strip() == BOOT_AFTER
