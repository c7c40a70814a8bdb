"""Issue 12, rows 1 and 2, on real QEMU guests: the races as they happen.

An agent in the test process (the manager as the service wires it, the
libvirt driver on qemu:///system, SQLite, enforce mode) and an out-of-band
actor in a native thread with a libvirt connection of its own, calling
``create()`` while the agent deletes or starts the same guest. QEMU takes
a second or more to destroy or start a guest, and holds the domain's job
meanwhile, so the actor's ``create()`` lands inside the agent's operation.
Every domain is named with a prefix of this test's own and removed after.
"""

from __future__ import annotations

import time
import uuid as uuidlib

import libvirt
import pytest

from compute_agent import green
from compute_agent.states import PowerState as P
from compute_agent.virt.libvirt.driver import LibvirtDriver
from tests.functional import qemu
from tests.libvirt_fixtures import libvirt_conf
from tests.unit.test_races import DELAY, Agent


class OutOfBand:
    """A native thread calling ``create()`` on a domain until told to stop."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.stop = green.native_event()
        self.done = green.native_event()
        self.started = 0
        self.refusals: list[int] = []
        green.native_thread(self._run, name="out-of-band")

    def _run(self) -> None:
        conn = qemu.open_system()
        try:
            while not self.stop.is_set():
                try:
                    conn.lookupByName(self.name).create()
                    self.started += 1
                except libvirt.libvirtError as exc:
                    self.refusals.append(exc.get_error_code())
                time.sleep(0.02)
        finally:
            conn.close()
            self.done.set()

    def finish(self) -> None:
        self.stop.set()
        green.execute(self.done.wait, 30)


@pytest.fixture
def agent(conf, sqlite_db):
    qemu.open_system().close()  # fails with how to get a libvirtd when there is none
    with qemu.guests() as prefix:
        conf.set_override("instance_name_template", qemu.name_template(prefix), group="compute")
        driver = LibvirtDriver(
            libvirt_conf(qemu.QEMU_URI, **{"libvirt.virt_type": "qemu"}),
        )
        a = Agent(conf, sqlite_db, driver)
        a.prefix = prefix
        try:
            yield a
        finally:
            a.stop()
            driver.cleanup_host()


def build(a: Agent) -> str:
    uid = str(uuidlib.uuid4())
    a.manager.build_instance({"uuid": uid, "name": "race", "vcpus": 1, "memory_mb": 64})
    return uid


def domains_of(a: Agent) -> list[str]:
    conn = qemu.open_system()
    try:
        return [d.name() for d in conn.listAllDomains() if d.name().startswith(a.prefix)]
    finally:
        conn.close()


def test_row1_delete_while_something_keeps_starting_the_guest(agent):
    uid = build(agent)
    name = agent.db.instance_get(uid).domain_name
    actor = OutOfBand(name)
    try:
        reply = agent.manager.delete_instance(uid)
    finally:
        actor.finish()
    print(f"\nout-of-band creates: {actor.started} started, refusals {set(actor.refusals)}")
    assert domains_of(agent) == []  # no guest left running without an owner row
    assert reply["vm_state"] == "deleted" and reply["power_state"] == "nostate"


def test_row2_start_racing_an_out_of_band_start(agent):
    uid = build(agent)
    inst = agent.db.instance_get(uid)
    agent.manager.stop_instance(uid)
    actor = OutOfBand(inst.domain_name)
    try:
        started = agent.manager.start_instance(uid)  # raced by the actor's create()
    finally:
        actor.finish()
    print(f"\nout-of-band creates: {actor.started} started, refusals {set(actor.refusals)}")
    assert (started["vm_state"], started["task_state"], started["power_state"]) == (
        "active",
        None,
        "running",
    )
    agent.quiet(10)
    green.sleep(DELAY * 2)
    agent.quiet(10)
    summary = agent.sync.run()  # enforce mode: the guest the user started stays up
    assert summary.domains_stopped == 0
    assert agent.driver.get_info(inst).state is P.RUNNING
    row = agent.db.instance_get(uid)
    assert (row.vm_state, row.power_state) == ("active", "running")
