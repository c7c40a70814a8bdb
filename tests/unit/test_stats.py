"""Statistics sampling: bulk and per-instance, a domain that never answers, the store."""

import datetime as dt

import pytest

from compute_agent import exception, green
from compute_agent.manager import STATS, ComputeManager
from compute_agent.service import NodeService
from compute_agent.states import PowerState as P
from compute_agent.stats import MAX_STUCK_CALLS, StatsSampler, StatsStore
from compute_agent.virt.driver import DomainStats
from compute_agent.virt.fake import FakeDriver
from tests.helpers import create_instance

HOST = "h1"
TIMEOUT = 0.2
UNRESPONSIVE = 0.3


def setup(db, count=3, bulk=True):
    driver = FakeDriver(bulk=bulk)
    driver.init_host(HOST)
    insts = []
    for _ in range(count):
        inst = create_instance(db, host=HOST)
        driver.add_domain(inst.domain_name, inst.uuid, P.RUNNING)
        insts.append(inst)
    sampler = StatsSampler(db, driver, HOST, call_timeout=TIMEOUT, unresponsive_after=UNRESPONSIVE)
    return sampler, driver, insts


def test_bulk_cycle_is_one_call_for_every_instance(sqlite_db):
    sampler, driver, insts = setup(sqlite_db, 5)
    driver.domains[insts[0].domain_name].cpu_time_ns = 123
    summary = sampler.run()
    assert driver.calls["get_all_stats"] == 1 and driver.calls["get_stats"] == 0
    assert (summary.mode, summary.sampled, summary.calls, summary.missing) == ("bulk", 5, 1, 0)
    got = sampler.get(insts[0].uuid)
    assert got["stats"]["cpu_time_ns"] == 123 and got["stats"]["state"] == "running"
    assert got["stats"]["memory_kb"] == 64 * 1024
    assert 0 <= got["age_s"] < 1 and got["unresponsive"] is False
    assert dt.datetime.fromisoformat(got["taken_at"].rstrip("Z"))


def test_a_domain_that_never_answers_is_skipped_then_unresponsive(sqlite_db):
    sampler, driver, insts = setup(sqlite_db, 3)
    sampler.run()
    hung = insts[1]
    driver.inject_fault("get_stats", "hang", names={hung.domain_name})
    summary = sampler.run()
    assert (summary.sampled, summary.incomplete) == (2, 1)
    assert summary.unresponsive == []  # not yet: its last sample is recent
    green.sleep(UNRESPONSIVE + 0.05)
    summary = sampler.run()
    assert summary.unresponsive == [hung.uuid]
    assert sampler.get(hung.uuid)["unresponsive"] is True
    assert sampler.get(insts[0].uuid)["unresponsive"] is False
    assert sampler.get(hung.uuid)["age_s"] > UNRESPONSIVE  # the old sample is kept, with its age
    driver.clear_faults()
    assert sampler.run().unresponsive == []


def test_a_bulk_call_that_hangs_is_left_behind_and_the_task_goes_on(sqlite_db):
    sampler, driver, insts = setup(sqlite_db, 2)
    driver.inject_fault("get_all_stats", "hang")
    started = green.monotonic()
    summary = sampler.run()
    assert green.monotonic() - started < TIMEOUT + 0.2
    assert (summary.timed_out, summary.missing, summary.sampled) == (1, 2, 0)
    driver.clear_faults()  # the hung call returns (with an error) and is forgotten
    green.sleep(0.05)
    assert sampler._stuck == set()
    assert sampler.run().sampled == 2


def test_per_instance_fallback_with_one_hung_domain(sqlite_db):
    sampler, driver, insts = setup(sqlite_db, 4, bulk=False)
    hung = insts[2]
    driver.inject_fault("get_stats", "hang", names={hung.domain_name})
    started = green.monotonic()
    summary = sampler.run()
    assert green.monotonic() - started < TIMEOUT + 0.2
    assert summary.mode == "per-instance"
    assert (summary.sampled, summary.timed_out, summary.calls) == (3, 1, 4)
    # The hung call still runs: that instance is not asked again meanwhile.
    summary = sampler.run()
    assert (summary.sampled, summary.missing, summary.calls) == (3, 1, 3)
    green.sleep(UNRESPONSIVE)
    assert sampler.run().unresponsive == [hung.uuid]
    driver.clear_faults()
    green.sleep(0.05)
    summary = sampler.run()
    assert (summary.sampled, summary.unresponsive) == (4, [])


def test_hung_calls_never_pile_up(sqlite_db):
    sampler, driver, insts = setup(sqlite_db, MAX_STUCK_CALLS + 3, bulk=False)
    driver.inject_fault("get_stats", "hang")
    sampler.run()
    assert len(sampler._stuck) == MAX_STUCK_CALLS  # the rest were not even tried
    calls = driver.calls["get_stats"]
    sampler.run()
    assert driver.calls["get_stats"] == calls
    driver.clear_faults()


def test_samples_of_instances_that_left_are_dropped(sqlite_db):
    sampler, driver, insts = setup(sqlite_db, 2)
    sampler.run()
    sqlite_db.instance_soft_delete(insts[0], source="rpc", reason="test")
    sampler.run()
    with pytest.raises(exception.InstanceNotFound):
        sampler.get(insts[0].uuid)
    assert len(sampler.store) == 1


def test_an_older_sample_never_replaces_a_newer_one():
    store = StatsStore(unresponsive_after=60)
    store.track({"u"}, now=0.0)
    now = dt.datetime(2026, 1, 1)
    new = DomainStats("d", "u", P.RUNNING, cpu_time_ns=2)
    old = DomainStats("d", "u", P.RUNNING, cpu_time_ns=1)
    assert store.record("u", new, 10.0, now)
    assert not store.record("u", old, 5.0, now)  # a slow call that started earlier
    assert store.get("u", 11.0)["stats"]["cpu_time_ns"] == 2
    assert not store.record("u", DomainStats("d", "u", P.RUNNING, complete=False), 20.0, now)
    assert store.get("u", 11.0)["stats"]["cpu_time_ns"] == 2  # incomplete: kept the complete one
    assert not store.record("gone", new, 30.0, now)  # untracked instances are not kept


def test_never_sampled_instance_becomes_unresponsive():
    store = StatsStore(unresponsive_after=5)
    store.track({"u"}, now=100.0)
    assert store.get("u", 104.0)["unresponsive"] is False
    assert store.get("u", 106.0) == {
        "uuid": "u",
        "stats": None,
        "taken_at": None,
        "age_s": None,
        "unresponsive": True,
    }


def test_the_manager_samples_in_its_own_periodic_task(conf, sqlite_db):
    conf.set_override("stats_interval", 1, group="compute")
    conf.set_override("stats_call_timeout", 1, group="compute")
    driver = FakeDriver()
    inst = create_instance(sqlite_db, host="test-host")
    driver.add_domain(inst.domain_name, inst.uuid, P.RUNNING)
    manager = ComputeManager(conf, sqlite_db, driver)
    service = NodeService(conf, sqlite_db, components=[manager])
    service.start()
    try:
        end = green.monotonic() + 5
        while service.runner.tasks[STATS].runs == 0 and green.monotonic() < end:
            green.sleep(0.02)
        stats = manager.get_instance_stats(inst.uuid)
        assert stats["stats"]["state"] == "running" and stats["unresponsive"] is False
        other = create_instance(sqlite_db, host="other-host")
        with pytest.raises(exception.InstanceNotFound):
            manager.get_instance_stats(other.uuid)
        with pytest.raises(exception.InvalidInput):
            manager.get_instance_stats("x; rm -rf /")
    finally:
        service.stop()


def test_one_hung_call_does_not_fail_the_healthy_calls(sqlite_db):
    """One call left behind must not turn healthy instances' calls into timeouts.

    Only calls past their deadline count against MAX_STUCK_CALLS; calls in
    flight that answer in time are no reason to refuse the next ones.
    """
    sampler, driver, insts = setup(sqlite_db, 8, bulk=False)
    hung = insts[0]
    driver.inject_fault("get_stats", "hang", names={hung.domain_name})
    driver.method_latency["get_stats"] = 0.02  # healthy calls are in flight together
    try:
        assert sampler.run().timed_out == 1  # the hung one
        summary = sampler.run()
        assert (summary.timed_out, summary.missing, summary.sampled) == (0, 1, 7)
    finally:
        driver.clear_faults()
