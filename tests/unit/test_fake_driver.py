"""The fake driver: faithful enough to test against, slow and broken on demand."""

import uuid

import pytest

from compute_agent import exception, green
from compute_agent.states import PowerState
from compute_agent.virt.fake import FakeDriver
from compute_agent.virt.spec import DomainSpec


class Ref:
    def __init__(self, name, uid):
        self.domain_name, self.uuid = name, uid


@pytest.fixture
def driver():
    d = FakeDriver()
    d.init_host("h")
    return d


def test_lifecycle(driver):
    uid = str(uuid.uuid4())
    driver.spawn(DomainSpec("vm1", uid, 1, 64))
    ref = Ref("vm1", uid)
    assert driver.instance_exists(ref) and driver.get_info(ref).state is PowerState.RUNNING
    driver.power_off(ref, timeout=0)
    assert driver.get_info(ref).state is PowerState.SHUTDOWN
    driver.power_on(ref)
    driver.reboot(ref)
    assert driver.get_info(ref).state is PowerState.RUNNING
    assert driver.get_num_instances() == 1 and driver.list_instances() == ["vm1"]
    driver.destroy(ref)
    assert not driver.instance_exists(ref)
    with pytest.raises(exception.InstanceNotFound):
        driver.get_info(ref)


def test_foreign_domain_is_refused(driver):
    driver.add_domain("vm1", str(uuid.uuid4()))
    with pytest.raises(exception.ForeignDomain):
        driver.get_info(Ref("vm1", str(uuid.uuid4())))


def test_latency_blocks_a_native_thread_not_the_hub():
    driver = FakeDriver(latency=0.3)
    driver.init_host("h")
    driver.add_domain("vm1", "u1")
    ticks = []

    def ticker():
        for _ in range(20):
            green.sleep(0.01)
            ticks.append(1)

    gt = green.spawn(ticker)
    t0 = green.monotonic()
    driver.get_info(Ref("vm1", "u1"))
    assert green.monotonic() - t0 >= 0.3
    assert len(ticks) >= 15  # the hub kept running meanwhile
    gt.wait()


def test_raise_fault_for_some_domains_a_limited_number_of_times(driver):
    driver.add_domain("a", "ua")
    driver.add_domain("b", "ub")
    driver.inject_fault("get_info", error=OSError("disk on fire"), names={"a"}, count=2)
    for _ in range(2):
        with pytest.raises(OSError):
            driver.get_info(Ref("a", "ua"))
    driver.get_info(Ref("a", "ua"))
    driver.get_info(Ref("b", "ub"))
    assert driver.calls["get_info"] == 4


def test_hang_fault_blocks_until_released(driver):
    driver.add_domain("a", "ua")
    driver.inject_fault("get_info", kind="hang")
    result = []

    def call():
        try:
            driver.get_info(Ref("a", "ua"))
        except exception.HypervisorUnavailable as exc:
            result.append(exc)

    gt = green.spawn(call)
    green.sleep(0.2)
    assert result == []
    driver.clear_faults()
    gt.wait()
    assert len(result) == 1


def test_soft_reboot_failure_falls_back_to_hard(driver):
    driver.add_domain("a", "ua", PowerState.RUNNING)
    driver.inject_fault("reboot", error=RuntimeError("guest agent missing"))
    driver.reboot(Ref("a", "ua"))
    assert driver.calls["reboot"] == 1 and driver.calls["reboot_hard"] == 1


def test_disconnected_driver_raises_unavailable(driver):
    events = []
    driver.add_connection_listener(lambda up, why: events.append(up))
    driver.disconnect()
    with pytest.raises(exception.HypervisorUnavailable):
        driver.get_num_instances()
    driver.reconnect()
    assert driver.get_num_instances() == 0 and events == [False, True]


def test_failed_start_leaves_nothing_defined(driver):
    driver.inject_fault("start", error=RuntimeError("no memory"))
    with pytest.raises(RuntimeError):
        driver.spawn(DomainSpec("vm1", str(uuid.uuid4()), 1, 64))
    assert driver.domains == {}
