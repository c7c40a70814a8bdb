"""Start-up recovery: nothing an earlier process left mid-operation stays stuck."""

import pytest

from compute_agent import exception, green
from compute_agent.locks import KeyedLocks
from compute_agent.manager import ComputeManager
from compute_agent.recovery import recover_interrupted
from compute_agent.service import NodeService
from compute_agent.states import PowerState as P
from compute_agent.utils import utcnow
from compute_agent.virt.fake import FakeDriver
from tests.helpers import create_instance

HOST = "test-host"


def stuck(db, driver, task, vm_state="active", domain=P.RUNNING):
    inst = create_instance(db, host=HOST, vm_state=vm_state, task_state=task)
    if domain is not None:
        driver.add_domain(inst.domain_name, inst.uuid, domain)
    return inst


@pytest.mark.parametrize(
    "task, vm_state, domain, want",
    [
        ("queued", "building", None, ("error", "nostate")),
        ("spawning", "building", None, ("error", "nostate")),
        ("spawning", "building", P.RUNNING, ("active", "running")),
        ("spawning", "building", P.SHUTDOWN, ("error", "nostate")),  # half-built: removed
        ("powering-off", "active", P.SHUTDOWN, ("stopped", "shutdown")),
        ("powering-off", "active", P.RUNNING, ("active", "running")),
        ("powering-on", "stopped", P.RUNNING, ("active", "running")),
        ("rebooting", "active", P.RUNNING, ("active", "running")),
        ("rebooting", "active", P.PAUSED, ("paused", "paused")),
        ("rebooting", "active", None, ("error", "nostate")),
    ],
)
def test_each_interrupted_task_is_settled_from_the_hypervisor(
    sqlite_db, task, vm_state, domain, want
):
    driver = FakeDriver()
    driver.init_host(HOST)
    inst = stuck(sqlite_db, driver, task, vm_state, domain)
    summary = recover_interrupted(sqlite_db, driver, HOST, KeyedLocks(), utcnow())
    row = sqlite_db.instance_get(inst.uuid)
    assert row.task_state is None
    assert (row.vm_state, row.power_state) == want
    assert summary.recovered == [inst.uuid]
    if want[0] == "error" and task in ("queued", "spawning"):
        assert inst.domain_name not in driver.domains
    last = sqlite_db.actions_get(inst.uuid)[0]
    assert last.source == "startup" and "interrupted by an agent restart" in last.reason


def test_an_interrupted_delete_is_completed(sqlite_db):
    driver = FakeDriver()
    driver.init_host(HOST)
    inst = stuck(sqlite_db, driver, "deleting")
    summary = recover_interrupted(sqlite_db, driver, HOST, KeyedLocks(), utcnow())
    assert summary.deleted == [inst.uuid] and driver.domains == {}
    assert sqlite_db.instance_get_all_by_host(HOST) == []


def test_operations_of_this_process_are_left_alone(sqlite_db):
    driver = FakeDriver()
    driver.init_host(HOST)
    started = utcnow()
    green.sleep(0.01)
    inst = stuck(sqlite_db, driver, "powering-off")  # written after this process started
    summary = recover_interrupted(sqlite_db, driver, HOST, KeyedLocks(), started)
    assert summary.recovered == []
    assert sqlite_db.instance_get(inst.uuid).task_state == "powering-off"


def test_the_agent_recovers_at_start_and_then_syncs(conf, sqlite_db):
    driver = FakeDriver()
    stuck_rows = [
        stuck(sqlite_db, driver, "spawning", "building"),
        stuck(sqlite_db, driver, "powering-off", "active", P.SHUTDOWN),
        stuck(sqlite_db, driver, "deleting"),
    ]
    fine = create_instance(sqlite_db, host=HOST)
    driver.add_domain(fine.domain_name, fine.uuid, P.RUNNING)
    manager = ComputeManager(conf, sqlite_db, driver)
    service = NodeService(conf, sqlite_db, components=[manager])
    service.start()
    try:
        end = green.monotonic() + 5
        while not manager._recovered and green.monotonic() < end:
            green.sleep(0.02)
        rows = sqlite_db.instance_get_all_by_host(HOST)
        assert all(r.task_state is None for r in rows)
        assert {r.uuid for r in rows} == {stuck_rows[0].uuid, stuck_rows[1].uuid, fine.uuid}
        assert sqlite_db.instance_get(stuck_rows[1].uuid).vm_state == "stopped"
        summary = manager.sync_power_states(timeout=5)
        assert summary["skipped"] == 0 and summary["errors"] == 0
    finally:
        service.stop()


def test_recovery_waits_for_the_hypervisor(conf, sqlite_db):
    driver = FakeDriver()
    inst = stuck(sqlite_db, driver, "rebooting")
    manager = ComputeManager(conf, sqlite_db, driver)
    service = NodeService(conf, sqlite_db, components=[manager])

    def unreachable(host):
        raise exception.HypervisorUnavailable("not yet")

    driver.init_host = unreachable
    service.start()
    try:
        green.sleep(0.1)
        assert sqlite_db.instance_get(inst.uuid).task_state == "rebooting"
        driver.reconnect()
        end = green.monotonic() + 5
        while not manager._recovered and green.monotonic() < end:
            green.sleep(0.02)
        assert sqlite_db.instance_get(inst.uuid).task_state is None
    finally:
        service.stop()


def test_one_bad_row_does_not_stop_the_others(sqlite_db):
    driver = FakeDriver()
    driver.init_host(HOST)
    bad = stuck(sqlite_db, driver, "rebooting")
    good = stuck(sqlite_db, driver, "rebooting")
    driver.inject_fault("get_info", error=RuntimeError("odd"), names={bad.domain_name})
    summary = recover_interrupted(sqlite_db, driver, HOST, KeyedLocks(), utcnow())
    assert summary.failed == [bad.uuid] and summary.recovered == [good.uuid]
