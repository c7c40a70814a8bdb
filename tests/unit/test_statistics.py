"""Each component's ``statistics()``: a frozen snapshot; and the driver's one power-state read."""

import dataclasses
import uuid

import pytest

from compute_agent import exception
from compute_agent.dispatch import Dispatcher
from compute_agent.manager import ComputeManager
from compute_agent.service import NodeService
from compute_agent.states import PowerState
from compute_agent.virt.fake import FakeDriver
from compute_agent.virt.libvirt.driver import LibvirtDriver
from tests.libvirt_fixtures import Inst, libvirt_conf, make_host


def _frozen(value):
    assert dataclasses.is_dataclass(value) and not isinstance(value, type)
    name = dataclasses.fields(value)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(value, name, None)


@pytest.fixture
def agent(conf, sqlite_db):
    conf.set_override("stats_interval", 0, group="compute")
    manager = ComputeManager(conf, sqlite_db, FakeDriver())
    service = NodeService(conf, sqlite_db, components=[manager])
    service.start()
    yield manager, service
    service.stop()


def test_every_statistics_is_a_frozen_snapshot(agent):
    manager, service = agent
    stats, svc = manager.statistics(), service.statistics()
    for value in (stats, svc, Dispatcher(manager, service).intake.statistics()):
        _frozen(value)
    for name in ("builds", "resume", "power_sync", "reaper", "stats", "events"):
        _frozen(getattr(stats, name))
    assert svc.tasks
    for value in (svc.hub_lag, *svc.tasks):
        _frozen(value)
    assert stats.driver is None  # the fake driver has no connection to describe
    # A snapshot does not move with the component.
    before = manager.operations.statistics()
    manager.operations.builds.add(completed=1)
    assert manager.operations.statistics().completed == before.completed + 1


def test_power_state_is_none_for_a_missing_domain_and_refuses_a_foreign_one():
    driver = FakeDriver()
    driver.init_host("h")
    ours = Inst(str(uuid.uuid4()), "vm1")
    assert driver.power_state(ours) is None
    driver.add_domain("vm1", ours.uuid)
    assert driver.power_state(ours) is PowerState.RUNNING
    with pytest.raises(exception.ForeignDomain):
        driver.power_state(Inst(str(uuid.uuid4()), "vm1"))


def test_libvirt_driver_statistics_and_power_state(tmp_path):
    uri, domains = make_host(tmp_path / "node.xml", 3)
    driver = LibvirtDriver(libvirt_conf(uri))
    driver.init_host("h")
    try:
        stats = driver.statistics()
        _frozen(stats)
        assert (stats.uri, stats.connected, stats.last_error, stats.in_flight) == (
            uri,
            True,
            None,
            0,
        )
        d = domains[0]
        assert (
            driver.power_state(Inst(d.uuid, d.name)) is driver.get_info(Inst(d.uuid, d.name)).state
        )
        assert driver.power_state(Inst(str(uuid.uuid4()), "instance-missing")) is None
        with pytest.raises(exception.ForeignDomain):
            driver.power_state(Inst(str(uuid.uuid4()), d.name))
    finally:
        driver.cleanup_host()
