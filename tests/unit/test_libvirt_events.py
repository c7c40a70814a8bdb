"""The agent on libvirt's test driver: real lifecycle events, operations, stats.

Out-of-band changes go through a second libvirt connection to the same
host, as an operator's virsh would; libvirt emits the events, the agent's
event-loop thread queues them, and the row follows.
"""

import uuid

import libvirt
import pytest

from compute_agent import exception, green
from compute_agent.manager import ComputeManager
from compute_agent.service import NodeService
from compute_agent.virt.libvirt.driver import LibvirtDriver, stats_from_record
from tests.helpers import wait_until
from tests.libvirt_fixtures import kill_connection, libvirt_conf, make_host

DELAY = 0.5


@pytest.fixture
def agent(tmp_path, sqlite_db):
    uri, _ = make_host(tmp_path / "node.xml", 0)
    conf = libvirt_conf(uri, host="test-host", periodic_fuzzy_delay=0)
    conf.set_override("state_path", str(tmp_path))
    conf.set_override("lifecycle_event_delay", DELAY, group="libvirt")
    conf.set_override("sync_power_state_interval", 3600, group="compute")
    conf.set_override("stats_interval", 3600, group="compute")
    conf.set_override("shutdown_timeout", 0, group="compute")
    driver = LibvirtDriver(conf)
    manager = ComputeManager(conf, sqlite_db, driver)
    service = NodeService(conf, sqlite_db, components=[manager])
    service.start()
    yield manager, driver
    service.stop()


def build(manager, count):
    return [
        manager.build_instance(
            {"uuid": str(uuid.uuid4()), "name": f"vm-{i}", "vcpus": 1, "memory_mb": 64}
        )
        for i in range(count)
    ]


def domain(driver, info):
    # The driver's own connection, used as virsh would use its own: the test
    # driver keeps one host per connection, so a second one would see nothing.
    return green.unproxy(driver.host.conn).lookupByName(f"instance-{info['uuid']}")


def out_of_band(fn):
    green.execute(fn)


def power(manager, info):
    return manager.get_instance_info(info["uuid"])["power_state"]


def test_out_of_band_changes_reach_the_database_through_events(agent):
    manager, driver = agent
    a, b = build(manager, 2)
    assert wait_until(lambda: manager.events.pending == 0)
    out_of_band(domain(driver, a).suspend)
    assert wait_until(lambda: power(manager, a) == "paused", 2)
    out_of_band(domain(driver, a).resume)
    assert wait_until(lambda: power(manager, a) == "running", 2)
    started = green.monotonic()
    out_of_band(domain(driver, b).destroy)
    assert wait_until(lambda: power(manager, b) == "shutdown", DELAY + 2)
    assert green.monotonic() - started >= DELAY  # the STOPPED waited
    assert manager.get_instance_info(b["uuid"])["vm_state"] == "stopped"
    # Started behind the agent's back while the cloud wants it stopped: the
    # STARTED event's sync enforces the stop (power_sync_action = enforce).
    dom = domain(driver, b)
    out_of_band(dom.create)
    assert wait_until(lambda: not green.execute(dom.isActive), 2)
    assert power(manager, b) == "shutdown"
    assert manager.events.counters.errors == 0


def test_reboot_through_the_hypervisor_is_not_taken_for_a_stop(agent):
    manager, driver = agent
    (a,) = build(manager, 1)
    assert wait_until(lambda: manager.events.pending == 0)
    dom = domain(driver, a)

    def reboot_by_hand():
        dom.destroy()
        dom.create()

    out_of_band(reboot_by_hand)
    green.sleep(DELAY + 0.3)
    assert manager.events.counters.cancelled >= 1
    info = manager.get_instance_info(a["uuid"])
    assert (info["vm_state"], info["power_state"]) == ("active", "running")


def test_operations_through_libvirt(agent):
    manager, driver = agent
    (a,) = build(manager, 1)
    assert a["vm_state"] == "active" and a["power_state"] == "running"
    assert manager.stop_instance(a["uuid"])["power_state"] == "shutdown"
    assert manager.start_instance(a["uuid"])["power_state"] == "running"
    assert manager.reboot_instance(a["uuid"], hard=True)["vm_state"] == "active"
    manager.delete_instance(a["uuid"])
    assert manager.list_instances() == []
    assert green.execute(green.unproxy(driver.host.conn).listAllDomains) == []


def test_events_resume_after_a_reconnection(agent):
    manager, driver = agent
    build(manager, 1)
    generation = driver.host.generation
    kill_connection(driver)
    # The in-process driver reports nothing on close; the next call finds out.
    with pytest.raises(exception.HypervisorUnavailable):
        driver.get_num_instances()
    assert wait_until(lambda: driver.connected and driver.host.generation > generation, 5)
    # The test driver starts each connection afresh from the node file, so
    # rebuild on the new connection, then change it out of band.
    (b,) = build(manager, 1)
    assert wait_until(lambda: manager.events.pending == 0)
    out_of_band(domain(driver, b).suspend)
    assert wait_until(lambda: power(manager, b) == "paused", 2)


def test_bulk_stats_from_the_test_driver(agent):
    manager, driver = agent
    insts = build(manager, 3)
    summary = manager.stats.run()
    assert (summary.mode, summary.sampled, summary.calls) == ("bulk", 3, 1)
    got = manager.get_instance_stats(insts[0]["uuid"])
    assert got["stats"]["state"] == "running" and not got["unresponsive"]


def test_stats_record_without_monitor_fields_is_incomplete_for_qemu():
    full = {
        "state.state": libvirt.VIR_DOMAIN_RUNNING,
        "cpu.time": 5,
        "balloon.rss": 1,
        "balloon.last-update": 2,
        "net.count": 2,
        "net.0.rx.bytes": 10,
        "net.1.rx.bytes": 5,
        "block.count": 1,
        "block.0.wr.bytes": 7,
    }
    stats = stats_from_record("d", "U", full, monitored=True)
    assert stats.complete and stats.net_rx_bytes == 15 and stats.block_wr_bytes == 7
    assert stats.uuid == "u" and stats.block_rd_bytes == 0 and stats.memory_kb is None
    skipped = {k: v for k, v in full.items() if not k.startswith("balloon")}
    assert not stats_from_record("d", "u", skipped, monitored=True).complete
    assert stats_from_record("d", "u", skipped, monitored=False).complete  # test driver
    stopped = {"state.state": libvirt.VIR_DOMAIN_SHUTOFF}
    assert stats_from_record("d", "u", stopped, monitored=True).complete


def test_events_off_means_no_listener(tmp_path, sqlite_db):
    uri, _ = make_host(tmp_path / "node.xml", 0)
    conf = libvirt_conf(uri, host="test-host")
    conf.set_override("state_path", str(tmp_path))
    conf.set_override("handle_lifecycle_events", False, group="compute")
    driver = LibvirtDriver(conf)
    manager = ComputeManager(conf, sqlite_db, driver)
    service = NodeService(conf, sqlite_db, components=[manager])
    service.start()
    try:
        assert manager.events is None and not driver.host.wants_events
        (a,) = build(manager, 1)
        out_of_band(domain(driver, a).suspend)
        green.sleep(0.3)
        assert power(manager, a) == "running"  # only the periodic sync would see it
    finally:
        service.stop()
