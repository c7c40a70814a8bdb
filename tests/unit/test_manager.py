"""The compute manager: hypervisor loss and return, and syncs on demand."""

import uuid

import pytest

from compute_agent import exception, green
from compute_agent.manager import POWER_SYNC, ComputeManager
from compute_agent.service import BINARY, HEARTBEAT, NodeService
from compute_agent.states import PowerState as P
from compute_agent.virt.fake import FakeDriver
from compute_agent.virt.libvirt.driver import LibvirtDriver
from tests.helpers import create_instance, wait_until
from tests.libvirt_fixtures import kill_connection, make_host


def add_instance(db, name, uid, vm_state="active", power="nostate"):
    return create_instance(
        db, host="test-host", uuid=uid, name=name, vm_state=vm_state, power_state=power
    )


@pytest.fixture
def fake_agent(conf, sqlite_db):
    conf.set_override("report_interval", 1)
    driver = FakeDriver()
    manager = ComputeManager(conf, sqlite_db, driver)
    service = NodeService(conf, sqlite_db, components=[manager])
    yield service, manager, driver
    service.stop()


def service_row(db):
    return db.service_get("test-host", BINARY)


def test_sync_is_a_periodic_task_in_its_own_greenthread(fake_agent, conf):
    service, manager, _ = fake_agent
    service.start()
    task = service.runner.tasks[POWER_SYNC]
    assert task.interval == conf.compute.sync_power_state_interval
    assert wait_until(lambda: task.runs >= 1)  # first run after the fuzzy delay (0)
    assert task.runs == 1 and task.last_error is None


def test_sync_now_for_the_host_and_for_one_instance(fake_agent, sqlite_db):
    service, manager, driver = fake_agent
    service.start()
    # The start-up sync first: run late (a loaded CI machine, threads) it took the
    # change below itself, and the forced sync then found nothing to change.
    assert wait_until(lambda: service.runner.tasks[POWER_SYNC].runs >= 1)
    uid = str(uuid.uuid4())
    add_instance(sqlite_db, "vm1", uid)
    driver.add_domain("vm1", uid, P.PAUSED)
    one = manager.sync_power_states(uid)
    assert one["changed"] == 1 and one["checked"] == 1
    driver.set_state("vm1", P.RUNNING, emit=False)  # seen by the sync, not an event
    host = manager.sync_power_states(timeout=5)
    assert host["changed"] == 1
    assert sqlite_db.instance_get(uid).power_state == "running"
    with pytest.raises(exception.InvalidInput):
        manager.sync_power_states("not-a-uuid")
    with pytest.raises(exception.InstanceNotFound):
        manager.sync_power_states(str(uuid.uuid4()))


def test_hypervisor_loss_disables_and_return_enables_and_syncs(fake_agent, sqlite_db):
    service, manager, driver = fake_agent
    service.start()
    green.sleep(0.05)
    runs_before = service.runner.tasks[POWER_SYNC].runs
    driver.disconnect("libvirtd went away")
    row = service_row(sqlite_db)
    assert row.disabled and row.disabled_reason.startswith("AUTO:")
    assert "libvirtd went away" in row.disabled_reason
    driver.reconnect()
    assert wait_until(lambda: service.runner.tasks[POWER_SYNC].runs > runs_before)
    row = service_row(sqlite_db)
    assert not row.disabled and row.disabled_reason is None


def test_a_manual_disable_is_never_undone(fake_agent, sqlite_db):
    service, manager, driver = fake_agent
    service.start()
    sqlite_db.service_set_disabled(service.row.id, True, "draining for maintenance")
    driver.disconnect()
    driver.reconnect()
    row = service_row(sqlite_db)
    assert row.disabled and row.disabled_reason == "draining for maintenance"


def test_agent_starts_without_the_hypervisor(conf, sqlite_db, tmp_path):
    conf.set_override("connection_uri", f"test:///{tmp_path}/absent.xml", group="libvirt")
    conf.set_override("reconnect_min_delay", 0.05, group="libvirt")
    manager = ComputeManager(conf, sqlite_db, LibvirtDriver(conf))
    service = NodeService(conf, sqlite_db, components=[manager])
    service.start()
    try:
        row = service_row(sqlite_db)
        assert row.disabled and row.disabled_reason.startswith("AUTO:")
        assert service.is_up()  # alive, just not taking work
    finally:
        service.stop()


def test_closing_libvirt_under_a_running_sync(conf, sqlite_db, tmp_path):
    """The connection dies mid-sync: AUTO-disabled, reconnected, re-enabled, full re-sync."""
    uri, domains = make_host(tmp_path / "node.xml", 400)
    for d in domains:
        add_instance(sqlite_db, d.name, d.uuid)
    conf.set_override("connection_uri", uri, group="libvirt")
    conf.set_override("reconnect_min_delay", 0.2, group="libvirt")
    conf.set_override("report_interval", 1)
    conf.set_override("sync_power_state_interval", 3600, group="compute")
    driver = LibvirtDriver(conf)
    manager = ComputeManager(conf, sqlite_db, driver)
    service = NodeService(conf, sqlite_db, components=[manager])
    disabled_seen = []

    def close_mid_run():
        while manager.power_sync.progress[0] < 100:
            green.sleep(0.005)  # a poll: a spin would hold the GIL from the sync under threads
        kill_connection(driver)
        # The loss is noticed, then the row disabled, by other tasks (threads: in
        # parallel with this one): wait for the row, not for the flag before it.
        deadline = green.monotonic() + 10
        while not service_row(sqlite_db).disabled_reason and green.monotonic() < deadline:
            green.sleep(0.005)
        disabled_seen.append(service_row(sqlite_db).disabled_reason)

    summaries = []
    real_run = manager.power_sync.run

    def recording_run():
        summary = real_run()
        summaries.append(summary)
        return summary

    manager.power_sync.run = recording_run  # before start: its first run may begin at once
    service.start()
    try:
        green.spawn(close_mid_run).wait()
        assert wait_until(lambda: len(summaries) >= 2, timeout=10)
        aborted, resync = summaries[0], summaries[1]
        assert aborted.aborted.startswith("hypervisor unavailable")
        assert 100 <= aborted.checked < 400
        assert disabled_seen and disabled_seen[0].startswith("AUTO: hypervisor connection lost")
        # The full sync after reconnection came by itself, and covered every instance.
        assert resync.aborted is None and resync.checked == 400 and resync.errors == 0
        assert not service_row(sqlite_db).disabled
        states = {i.uuid: i.power_state for i in sqlite_db.instance_get_all_by_host("test-host")}
        # Suspended guests of active instances are stopped by the sync (policy row 3).
        expected = {d.uuid: "shutdown" if d.state is P.SUSPENDED else str(d.state) for d in domains}
        assert states == expected
        assert service.runner.tasks[HEARTBEAT].max_lateness < 0.2
    finally:
        service.stop()
