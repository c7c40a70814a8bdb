"""Guests of deleted instances on real QEMU: the reap path, and foreign guests left alone.

An agent process on ``qemu:///system`` and PostgreSQL (no broker: the test
drives it through its admin socket and ``compute-agent-manage``) builds
three guests. Behind its back, one row is soft-deleted while its guest runs
on (a running-deleted guest), and another row is soft-deleted while its
domain is replaced by a running guest of the same name and another UUID (a
foreign guest a name-only match would kill); one more prefixed guest
belongs to no row at all. ``reap-deleted`` must remove exactly the first,
audit it, and leave every other guest in the same QEMU process. The
periodic schedule is off (interval 0), so only the forced run acts.
"""

from __future__ import annotations

import contextlib
import json
import pathlib
import signal
import uuid as uuidlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import libvirt
import pytest
import sqlalchemy as sa

from compute_agent.admin.client import AdminClient
from compute_agent.db.api import Database
from compute_agent.db.models import Instance, InstanceAction
from compute_agent.utils import utcnow
from tests.functional import qemu
from tests.functional.agent_process import AgentProcess, manage
from tests.helpers import eventually

MEMORY_MB = 64


@dataclass
class Env:
    prefix: str
    db: Database
    conn: libvirt.virConnect
    agent: AgentProcess
    config_files: list[pathlib.Path]
    admin: AdminClient

    def name(self, uuid: str) -> str:
        return f"{self.prefix}{uuid}"

    def build(self, uuid: str) -> dict[str, Any]:
        instance = {"uuid": uuid, "name": f"r-{uuid[:8]}", "vcpus": 1, "memory_mb": MEMORY_MB}
        return self.admin.call("build_instance", {"instance": instance})

    def soft_delete_behind_the_agents_back(self, uuid: str) -> None:
        """What a controller deleting the row itself (or a lost delete) leaves."""
        table = Instance.__table__
        with self.db.engine.begin() as c:
            done = c.execute(
                sa.update(table)
                .where(table.c.uuid == uuid)
                .values(deleted=True, deleted_at=utcnow(), vm_state="deleted", task_state=None)
            )
        assert done.rowcount == 1

    def actions(self, uuid: str) -> list[sa.Row]:
        table = InstanceAction.__table__
        with self.db.engine.connect() as c:
            return list(
                c.execute(
                    sa.select(table)
                    .where(table.c.instance_uuid == uuid, table.c.action == "running_deleted")
                    .order_by(table.c.id)
                )
            )

    def running(self, name: str) -> tuple[str, int]:
        """The UUID and QEMU PID of a running guest."""
        dom = self.conn.lookupByName(name)
        assert dom.isActive(), name
        return dom.UUIDString(), qemu.qemu_pid(name)


def _write_conf(path: pathlib.Path, prefix: str, db_url: str) -> None:
    path.write_text(
        f"[DEFAULT]\nhost = reaper-{prefix.rstrip('-')}\nstate_path = {path.parent}/state\n"
        "report_interval = 1\nperiodic_fuzzy_delay = 0\n"
        "[compute]\n"
        f"instance_name_template = {qemu.name_template(prefix)}\n"
        "sync_power_state_interval = 600\n"
        "stats_interval = 0\n"
        "shutdown_timeout = 1\n"
        "running_deleted_instance_poll_interval = 0\n"
        "running_deleted_instance_action = reap\n"
        "[libvirt]\nconnection_uri = qemu:///system\nvirt_type = qemu\n"
        "lifecycle_event_delay = 1\n"
        f"[database]\nconnection = {db_url}\n"
    )


@pytest.fixture(scope="module")
def env(db_url_factory, tmp_path_factory) -> Iterator[Env]:
    conn = qemu.open_system()
    prefix = qemu.new_prefix()
    db_url = db_url_factory("postgresql")
    root = tmp_path_factory.mktemp("qemu-reaper")
    conf = root / "agent.conf"
    _write_conf(conf, prefix, db_url)
    files = [conf]
    db = Database(db_url)
    agent: AgentProcess | None = None
    try:
        synced = manage("db", "sync", config_files=files)
        assert synced.returncode == 0, synced.stderr
        agent = AgentProcess(files)
        agent.wait_for("admin socket listening")
        admin = AdminClient(str(root / "state" / "admin.sock"), timeout=90)
        yield Env(prefix, db, conn, agent, files, admin)
        agent.proc.send_signal(signal.SIGTERM)
        assert agent.wait_exit(15) == 0, agent.output
        assert "Traceback" not in agent.output, agent.output
    finally:
        if agent is not None:
            agent.kill()
            (root / "agent.log").write_text(agent.output)  # for a failure's post-mortem
        with contextlib.suppress(libvirt.libvirtError):
            conn.close()
        qemu.remove_domains(prefix)
        db.dispose()


def test_reap_deleted_removes_only_the_guest_of_a_deleted_instance(env):
    doomed, replaced, kept = (str(uuidlib.uuid4()) for _ in range(3))
    for uuid in (doomed, replaced, kept):
        assert env.build(uuid)["power_state"] == "running"

    # A running-deleted guest: the row is deleted, the guest runs on.
    env.soft_delete_behind_the_agents_back(doomed)
    # A deleted row whose domain name now belongs to another guest (another UUID).
    env.soft_delete_behind_the_agents_back(replaced)
    old = env.conn.lookupByName(env.name(replaced))
    old.undefine()
    old.destroy()
    impostor_uuid = str(uuidlib.uuid4())
    qemu.define_guest(env.conn, env.name(replaced), impostor_uuid, start=True)
    # A prefixed guest no row claims at all.
    stray = f"{env.prefix}stray"
    qemu.define_guest(env.conn, stray, str(uuidlib.uuid4()), start=True)
    before = {n: env.running(n) for n in (env.name(replaced), stray, env.name(kept))}
    assert env.running(env.name(doomed))[0] == doomed

    done = manage("reap-deleted", "-f", "json", config_files=env.config_files)
    assert done.returncode == 0, (done.stdout, done.stderr)
    summary = json.loads(done.stdout)
    assert (summary["action"], summary["found"], summary["reaped"]) == ("reap", 1, 1), summary
    assert (summary["errors"], summary["foreign"], summary["aborted"]) == (0, 0, None), summary
    assert summary["domains"] == [env.name(doomed)]

    # Gone from libvirt: neither by UUID nor by name, not even as a definition.
    with pytest.raises(libvirt.libvirtError):
        env.conn.lookupByUUIDString(doomed)
    assert env.name(doomed) not in {d.name() for d in env.conn.listAllDomains()}
    # Every other guest runs on in the same QEMU process, under the same UUID.
    assert {n: env.running(n) for n in before} == before
    assert env.db.instance_get(kept).vm_state == "active"

    (row,) = env.actions(doomed)
    assert (row.field, row.old_value, row.new_value, row.source) == (
        "domain",
        "running",
        "reaped",
        "sync",
    )
    assert env.actions(replaced) == [] and env.actions(kept) == []
    env.agent.wait_for(f"domain {env.name(doomed)} of instance {doomed}", 5)

    figures = env.admin.call("status")["running_deleted"]
    assert figures["action"] == "reap" and figures["totals"]["reaped"] == 1

    # Nothing left to do: a second run finds nothing and touches nothing.
    again = json.loads(manage("reap-deleted", "-f", "json", config_files=env.config_files).stdout)
    assert (again["found"], again["reaped"]) == (0, 0)
    assert {n: env.running(n) for n in before} == before
    # The agent's own view: the stray and the impostor are unknown domains, never acted on.
    synced = json.loads(manage("power-sync", "-f", "json", config_files=env.config_files).stdout)
    assert {env.name(replaced), stray} <= set(synced["unknown_domains"])
    assert eventually(
        lambda: env.db.instance_get(kept).power_state == "running", 10, "kept guest row"
    )
