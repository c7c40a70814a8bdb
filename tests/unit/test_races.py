"""Issue 12: one deterministic regression test per race of its table.

Each race is played on purpose: the fake driver's ``after`` hooks (or a
patched libvirt call on libvirt's own test driver) make the out-of-band
action happen exactly inside the agent's window. The agent is wired as the
service wires it (``ComputeManager``: sync, lifecycle events and operations
sharing one lock table and one "really stopped" rule), with
``lifecycle_event_delay`` short. docs/reliability.md, "Races (issue 12)",
says what each test reproduces.
"""

from __future__ import annotations

import uuid as uuidlib

import libvirt
import pytest

from compute_agent import exception, green
from compute_agent.manager import ComputeManager
from compute_agent.states import ActionSource
from compute_agent.states import PowerState as P
from compute_agent.virt.fake import FakeDriver
from compute_agent.virt.libvirt.driver import LibvirtDriver
from compute_agent.virt.spec import DomainSpec
from tests.helpers import create_instance, wait_until
from tests.libvirt_fixtures import libvirt_conf, make_host

HOST = "test-host"
DELAY = 1.0  # [libvirt] lifecycle_event_delay for these tests: long enough for a loaded CI
RPC = ActionSource.RPC


class Agent:
    """A manager with its events flowing, on a given driver, in enforce mode."""

    def __init__(self, conf, db, driver) -> None:
        conf.set_override("lifecycle_event_delay", DELAY, group="libvirt")
        conf.set_override("power_sync_action", "enforce", group="compute")
        conf.set_override("shutdown_timeout", 0, group="compute")
        self.db = db
        self.driver = driver
        self.manager = ComputeManager(conf, db, driver)
        if self.manager.events is not None:
            driver.set_event_listener(self.manager.events.on_event)
        driver.init_host(HOST)
        self.ops = self.manager.operations
        self.sync = self.manager.power_sync

    def instance(self, state=P.RUNNING, vm_state="active", power="running"):
        uid = str(uuidlib.uuid4())
        inst = create_instance(self.db, host=HOST, uuid=uid, vm_state=vm_state, power_state=power)
        if state is not None and isinstance(self.driver, FakeDriver):
            self.driver.add_domain(inst.domain_name, uid, state)
        return inst

    def row(self, inst):
        return self.db.instance_get(inst.uuid)

    def quiet(self, timeout: float = 5.0) -> None:
        """Wait for every event, delayed sync and re-check to be over."""
        events = self.manager.events
        assert wait_until(lambda: events is None or events.pending == 0, timeout)

    def stop(self) -> None:
        if self.manager.events is not None:
            self.manager.events.stop(grace=5)
        self.driver.set_event_listener(None)


@pytest.fixture
def agent(conf, sqlite_db):
    a = Agent(conf, sqlite_db, FakeDriver())
    yield a
    a.stop()


@pytest.fixture
def lv_agent(conf, sqlite_db, tmp_path):
    """The agent on libvirt's test driver (a host file of its own)."""
    uri, _ = make_host(tmp_path / "node.xml", 1)
    conf.set_override("connection_uri", uri, group="libvirt")
    driver = LibvirtDriver(libvirt_conf(uri))
    a = Agent(conf, sqlite_db, driver)
    yield a
    a.stop()
    driver.cleanup_host()


def lv_instance(a: Agent, running: bool):
    """An instance row and its domain on the libvirt test driver."""
    inst = a.instance(state=None, power="running" if running else "shutdown")
    if not running:
        a.db.instance_update(inst, {"vm_state": "stopped"}, action="test", source="rpc")
    a.driver.spawn(DomainSpec.for_instance(inst))
    if not running:
        a.driver.power_off(inst, timeout=0)
    return a.row(inst)


def raw_domain(a: Agent, inst):
    return a.driver.host.conn.lookupByName(inst.domain_name)


# -- 1: delete racing an out-of-band start --------------------------------------


def test_row1_delete_racing_a_start_leaves_no_guest_behind(agent):
    """The start lands between the driver's steps: the delete finishes the job."""
    inst = agent.instance()

    def started_meanwhile(name: str) -> None:
        agent.driver.after.pop("destroy")  # once
        agent.driver.add_domain(name, inst.uuid, P.RUNNING)

    agent.driver.after["destroy"] = started_meanwhile
    reply = agent.manager.delete_instance(inst.uuid)
    assert reply["vm_state"] == "deleted"
    assert inst.domain_name not in agent.driver.domains  # no running guest without a row
    assert agent.driver.calls["destroy"] == 2


def test_row1_libvirt_destroy_leaves_nothing_a_concurrent_start_can_run(lv_agent, monkeypatch):
    """On libvirt: a create() right after the destroy used to survive the undefine
    as a running transient domain; undefined first, there is nothing to start."""
    inst = lv_instance(lv_agent, running=True)
    real_destroy = libvirt.virDomain.destroy
    raced = []

    def destroy_then_someone_starts_it(dom):
        result = real_destroy(dom)
        if not raced:
            raced.append(1)
            try:
                dom.create()  # the out-of-band start, in the destroy's window
            except libvirt.libvirtError as exc:
                raced.append(exc.get_error_code())
        return result

    monkeypatch.setattr(libvirt.virDomain, "destroy", destroy_then_someone_starts_it)
    lv_agent.driver.destroy(inst)
    assert raced  # the race was played
    assert not lv_agent.driver.instance_exists(inst)
    names = [d.name() for d in lv_agent.driver.host.conn.listAllDomains()]
    assert inst.domain_name not in names


# -- 2 and 5: the agent's start racing an out-of-band start ---------------------


def _create_races_a_start(monkeypatch):
    """The next create() finds the domain started meanwhile: 'already running'."""
    real_create = libvirt.virDomain.create
    raced = []

    def create(dom):
        if not raced:
            raced.append(1)
            real_create(dom)  # out of band, a moment earlier
        return real_create(dom)

    monkeypatch.setattr(libvirt.virDomain, "create", create)
    return raced


def test_row2_start_finding_the_guest_already_running_succeeds_and_is_not_stopped(
    lv_agent, monkeypatch
):
    inst = lv_instance(lv_agent, running=False)
    raced = _create_races_a_start(monkeypatch)
    started = lv_agent.manager.start_instance(inst.uuid)
    assert raced
    assert (started["vm_state"], started["task_state"], started["power_state"]) == (
        "active",
        None,
        "running",
    )
    summary = lv_agent.sync.run()  # enforce mode: nothing to stop
    assert summary.domains_stopped == 0
    assert raw_domain(lv_agent, inst).isActive()


def test_row5_hard_reboot_racing_a_start_succeeds(lv_agent, monkeypatch, caplog):
    inst = lv_instance(lv_agent, running=True)
    raced = _create_races_a_start(monkeypatch)
    rebooted = lv_agent.manager.reboot_instance(inst.uuid, hard=True)
    assert raced and rebooted["vm_state"] == "active" and rebooted["power_state"] == "running"
    assert "Traceback" not in caplog.text


def test_row5_a_libvirt_refusal_is_a_typed_error_never_a_raw_one(lv_agent, monkeypatch, caplog):
    """A real VIR_ERR_OPERATION_INVALID from libvirt reaches the caller as
    InstanceInvalidState, one log line, no traceback."""
    inst = lv_instance(lv_agent, running=False)

    def refused(dom):
        dom.reboot(0)  # libvirt's own VIR_ERR_OPERATION_INVALID: "domain is not running"

    monkeypatch.setattr(libvirt.virDomain, "create", refused)
    with pytest.raises(exception.InstanceInvalidState, match="libvirt refused to start"):
        lv_agent.manager.start_instance(inst.uuid)
    row = lv_agent.row(inst)
    assert (row.vm_state, row.task_state) == ("stopped", None)
    assert "Traceback" not in caplog.text


# -- 3: a stop racing an out-of-band start ----------------------------------------


def _boots_after(agent: Agent, name: str, seconds: float = 0.15) -> None:
    """An out-of-band start: QEMU's start-up pause, then running."""
    agent.driver.set_state(name, P.PAUSED)
    green.spawn_after(seconds, agent.driver.set_state, name, P.RUNNING)


def test_row3_stop_racing_a_start_never_settles_as_paused(agent):
    inst = agent.instance()
    agent.driver.after["power_off"] = lambda name: _boots_after(agent, name)
    stopped = agent.manager.stop_instance(inst.uuid)
    # The start won: the instance is what its domain now is, not "paused".
    assert (stopped["vm_state"], stopped["power_state"]) == ("active", "running")
    agent.quiet()
    assert agent.driver.domains[inst.domain_name].state is P.RUNNING


@pytest.mark.parametrize("vm_state", ["paused", "suspended"])
def test_row3_paused_or_suspended_but_running_heals_to_active(agent, vm_state):
    inst = agent.instance(vm_state=vm_state, power=vm_state)
    agent.sync.run()
    row = agent.row(inst)
    assert (row.vm_state, row.power_state) == ("active", "running")


# -- 4: a reboot's shut-off recorded as stopped, then the guest stopped -----------


def test_row4_forced_sync_in_a_reboots_shutoff_does_not_stop_the_guest(agent):
    inst = agent.instance()
    agent.driver.set_state(inst.domain_name, P.SHUTDOWN)  # an out-of-band reboot: destroy
    agent.manager.sync_power_states(inst.uuid)  # a forced sync in the window
    row = agent.row(inst)
    assert row.vm_state == "active"  # power_state may say shutdown; vm_state must not
    agent.driver.set_state(inst.domain_name, P.RUNNING)  # ... then create
    agent.quiet()
    green.sleep(DELAY * 1.5)  # past any delayed re-check
    agent.quiet()
    row = agent.row(inst)
    assert (row.vm_state, row.power_state) == ("active", "running")
    assert agent.driver.domains[inst.domain_name].state is P.RUNNING
    assert agent.driver.calls["power_off"] == 0


def test_row4_a_shutoff_that_persists_is_recorded_as_stopped_after_the_delay(agent):
    """The other half of the rule: a real stop is recorded, once it persisted."""
    inst = agent.instance()
    agent.driver.set_state(inst.domain_name, P.SHUTDOWN, emit=False)  # an event lost
    started = green.monotonic()
    agent.sync.run()
    assert agent.row(inst).vm_state == "active"
    assert wait_until(lambda: agent.row(inst).vm_state == "stopped", DELAY * 10)
    assert green.monotonic() - started >= DELAY
    assert agent.row(inst).power_state == "shutdown"


def test_row4_paused_instance_in_a_reboots_shutoff_is_not_stopped(agent):
    inst = agent.instance(state=P.SHUTDOWN, vm_state="paused", power="paused")
    agent.sync.run()  # the paused -> stopped rule re-reads after the delay too
    assert agent.row(inst).vm_state == "paused"
    agent.driver.set_state(inst.domain_name, P.RUNNING)
    agent.quiet()
    green.sleep(DELAY * 1.5)
    agent.quiet()
    row = agent.row(inst)
    assert (row.vm_state, row.power_state) == ("active", "running")
    assert agent.driver.calls["power_off"] == 0


def test_row4_hard_reboot_settle_waits_out_the_shutoff(agent):
    inst = agent.instance()

    def rebooted_again_meanwhile(name: str) -> None:
        agent.driver.set_state(name, P.SHUTDOWN)
        green.spawn_after(0.15, agent.driver.set_state, name, P.RUNNING)

    agent.driver.after["reboot_hard"] = rebooted_again_meanwhile
    rebooted = agent.manager.reboot_instance(inst.uuid, hard=True)
    assert (rebooted["vm_state"], rebooted["power_state"]) == ("active", "running")
    agent.quiet()
    green.sleep(DELAY * 1.5)
    agent.quiet()
    assert agent.driver.domains[inst.domain_name].state is P.RUNNING
    assert agent.row(inst).vm_state == "active"


# -- 6: every enforced stop is audited ----------------------------------------------


def test_row6_an_enforced_stop_is_audited_even_when_the_row_said_shutdown(agent):
    inst = agent.instance(vm_state="stopped", power="shutdown")  # domain running
    summary = agent.sync.run()
    assert summary.domains_stopped == 1
    assert agent.driver.domains[inst.domain_name].state is P.SHUTDOWN
    stops = [a for a in agent.db.actions_get(inst.uuid) if a.action == "power_sync"]
    assert len(stops) == 1
    assert (stops[0].field, stops[0].old_value, stops[0].new_value) == (
        "power_state",
        "running",
        "shutdown",
    )
    assert "stopped by the sync" in stops[0].reason


# -- 7: a delete's reply -------------------------------------------------------------


def test_row7_a_deletes_reply_does_not_say_running(agent):
    inst = agent.instance()
    reply = agent.manager.delete_instance(inst.uuid)
    assert (reply["vm_state"], reply["power_state"]) == ("deleted", "nostate")


# -- 8: a missing domain is recoverable ----------------------------------------------


def test_row8_stop_then_start_of_an_instance_whose_domain_is_gone(agent):
    inst = agent.instance()
    del agent.driver.domains[inst.domain_name]  # test:///default after a restart
    agent.sync.run()
    assert (agent.row(inst).vm_state, agent.row(inst).power_state) == ("active", "nostate")
    stopped = agent.manager.stop_instance(inst.uuid)
    assert (stopped["vm_state"], stopped["task_state"], stopped["power_state"]) == (
        "stopped",
        None,
        "nostate",
    )
    started = agent.manager.start_instance(inst.uuid)
    assert (started["vm_state"], started["power_state"]) == ("active", "running")
    dom = agent.driver.domains[inst.domain_name]
    assert (dom.uuid, dom.vcpus, dom.memory_mb, dom.state) == (inst.uuid, 1, 64, P.RUNNING)
    assert any(a.field == "domain" for a in agent.db.actions_get(inst.uuid))


def test_row8_hard_reboot_re_creates_a_missing_domain(agent):
    inst = agent.instance()
    del agent.driver.domains[inst.domain_name]
    with pytest.raises(exception.InstanceNotFound, match="reboot --hard re-creates it"):
        agent.manager.reboot_instance(inst.uuid, hard=False)
    rebooted = agent.manager.reboot_instance(inst.uuid, hard=True)
    assert (rebooted["vm_state"], rebooted["power_state"]) == ("active", "running")
    assert agent.driver.domains[inst.domain_name].state is P.RUNNING


def test_row8_on_libvirt_hard_reboot_re_creates_the_domain(lv_agent):
    inst = lv_instance(lv_agent, running=True)
    lv_agent.driver.destroy(inst)
    rebooted = lv_agent.manager.reboot_instance(inst.uuid, hard=True)
    assert (rebooted["vm_state"], rebooted["power_state"]) == ("active", "running")
    assert raw_domain(lv_agent, inst).isActive()
