"""Guests of deleted instances: each action, and every domain that must be left alone."""

import logging
import uuid as uuidlib

import pytest

from compute_agent import exception, green
from compute_agent.dispatch import Dispatcher
from compute_agent.locks import KeyedLocks
from compute_agent.manager import REAPER, ComputeManager
from compute_agent.reaper import DeletedGuestReaper
from compute_agent.service import NodeService
from compute_agent.states import ActionSource
from compute_agent.states import PowerState as P
from compute_agent.virt.fake import FakeDriver
from tests.helpers import create_instance, wait_until
from tests.unit.test_config import load_file


@pytest.fixture
def driver():
    d = FakeDriver()
    d.init_host("h1")
    return d


def deleted(db, driver, hv=P.RUNNING, host="h1"):
    """A soft-deleted instance of ``host`` whose domain (in state ``hv``) is still there."""
    inst = create_instance(db, host=host)
    db.instance_soft_delete(inst, source="rpc", reason="test")
    if hv is not None:
        driver.add_domain(inst.domain_name, inst.uuid, hv)
    return inst


def live(db, driver, host="h1"):
    inst = create_instance(db, host=host)
    driver.add_domain(inst.domain_name, inst.uuid, P.RUNNING)
    return inst


def reaper(db, driver, action="reap", **kw):
    return DeletedGuestReaper(db, driver, "h1", kw.pop("locks", KeyedLocks()), action=action, **kw)


def audit(db, inst):
    return [a for a in db.actions_get(inst.uuid) if a.action == "running_deleted"]


def test_reap_removes_the_guest_of_a_deleted_instance_and_audits_it(db, driver):
    gone = deleted(db, driver)
    mine = live(db, driver)
    driver.add_domain("someone-elses-vm", str(uuidlib.uuid4()))
    summary = reaper(db, driver).run()
    assert (summary.found, summary.reaped, summary.errors, summary.deferred) == (1, 1, 0, 0)
    assert summary.domains == [gone.domain_name] and summary.aborted is None
    assert set(driver.domains) == {mine.domain_name, "someone-elses-vm"}
    (row,) = audit(db, gone)
    assert (row.field, row.old_value, row.new_value, row.source) == (
        "domain",
        "running",
        "reaped",
        "sync",
    )
    assert "running_deleted_instance_action = reap" in row.reason
    assert audit(db, mine) == []
    assert driver.calls["list_domains"] == 1  # one listing per run, never one per instance


def test_a_shut_off_leftover_definition_is_reaped_too(db, driver):
    gone = deleted(db, driver, hv=P.SHUTDOWN)
    assert reaper(db, driver).run().reaped == 1
    assert gone.domain_name not in driver.domains
    assert audit(db, gone)[0].old_value == "shutdown"


def test_foreign_domains_are_never_touched(db, driver):
    # The name of a deleted instance's domain, another UUID.
    same_name = deleted(db, driver, hv=None)
    driver.add_domain(same_name.domain_name, str(uuidlib.uuid4()))
    # A deleted instance's UUID under another name.
    same_uuid = deleted(db, driver, hv=None)
    driver.add_domain("renamed-" + same_uuid.uuid, same_uuid.uuid)
    # A deleted instance of another host, its domain here.
    elsewhere = deleted(db, driver, host="h2")
    before = {n: (d.uuid, d.state) for n, d in driver.domains.items()}
    for action in ("reap", "shutdown", "log", "noop"):
        summary = reaper(db, driver, action).run()
        assert summary.found == 0 and summary.domains == []
    assert {n: (d.uuid, d.state) for n, d in driver.domains.items()} == before
    assert driver.calls["destroy"] == driver.calls["power_off"] == driver.calls["get_info"] == 0
    for inst in (same_name, same_uuid, elsewhere):
        assert audit(db, inst) == []


def test_a_domain_that_changed_hands_before_the_action_is_left_alone(db, driver):
    gone = deleted(db, driver)
    other = str(uuidlib.uuid4())
    real = driver.list_domains

    def listing_then_swap():
        listed = real()
        driver.domains.pop(gone.domain_name)
        driver.add_domain(gone.domain_name, other)  # someone else's guest, same name
        return listed

    driver.list_domains = listing_then_swap
    summary = reaper(db, driver).run()
    assert (summary.found, summary.foreign, summary.reaped) == (1, 1, 0)
    assert driver.domains[gone.domain_name].uuid == other
    assert driver.domains[gone.domain_name].state == P.RUNNING
    assert audit(db, gone) == []


def test_a_domain_gone_before_the_action_is_skipped(db, driver):
    gone = deleted(db, driver)
    real = driver.list_domains

    def listing_then_delete():
        listed = real()
        driver.domains.pop(gone.domain_name)
        return listed

    driver.list_domains = listing_then_delete
    summary = reaper(db, driver).run()
    assert (summary.found, summary.skipped, summary.reaped, summary.errors) == (1, 1, 0, 0)
    assert audit(db, gone) == []


def test_shutdown_forces_the_guest_off_and_keeps_its_definition(db, driver):
    running = deleted(db, driver)
    paused = deleted(db, driver, hv=P.PAUSED)
    off = deleted(db, driver, hv=P.SHUTDOWN)
    summary = reaper(db, driver, "shutdown").run()
    assert (summary.found, summary.shut_down, summary.already_off) == (3, 2, 1)
    for inst in (running, paused, off):
        assert driver.domains[inst.domain_name].state == P.SHUTDOWN  # still defined
    assert driver.calls["power_off"] == 2 and driver.calls["destroy"] == 0
    assert [(a.old_value, a.new_value) for a in audit(db, running)] == [("running", "shut-off")]
    assert [(a.old_value, a.new_value) for a in audit(db, paused)] == [("paused", "shut-off")]
    assert audit(db, off) == []  # nothing done, nothing recorded
    again = reaper(db, driver, "shutdown").run()
    assert (again.found, again.shut_down, again.already_off) == (3, 0, 3)


def test_log_warns_and_audits_but_touches_nothing(db, driver, caplog):
    gone = deleted(db, driver)
    with caplog.at_level(logging.WARNING, logger="compute_agent.reaper"):
        summary = reaper(db, driver, "log").run()
    assert (summary.found, summary.logged) == (1, 1)
    assert driver.domains[gone.domain_name].state == P.RUNNING
    assert driver.calls["destroy"] == driver.calls["power_off"] == 0
    assert any(
        gone.uuid in r.getMessage() and "running_deleted_instance_action = log" in r.getMessage()
        for r in caplog.records
    )
    assert [(a.old_value, a.new_value) for a in audit(db, gone)] == [("running", "logged")]


def test_noop_only_counts(db, driver):
    gone = deleted(db, driver)
    summary = reaper(db, driver, "noop").run()
    assert (summary.found, summary.ignored) == (1, 1)
    assert driver.domains[gone.domain_name].state == P.RUNNING
    assert driver.calls["destroy"] == driver.calls["power_off"] == 0
    assert audit(db, gone) == []


def test_a_run_handles_at_most_max_per_run_the_rest_waits(db, driver):
    for _ in range(5):
        deleted(db, driver)
    task = reaper(db, driver, max_per_run=2)
    runs = [task.run() for _ in range(4)]
    assert [(s.found, s.reaped, s.deferred) for s in runs] == [
        (5, 2, 3),
        (3, 2, 1),
        (1, 1, 0),
        (0, 0, 0),
    ]
    assert driver.domains == {}
    assert task.runs == 4 and task.totals["reaped"] == 5


def test_domains_the_bound_left_out_get_their_turn_whatever_became_of_the_first(db, driver):
    """More leftovers than max_per_run, the first of them never going away (already off
    under ``shutdown``, a destroy that keeps failing under ``reap``): each run took the same
    first ones, and the rest, running guests among them, were never acted on."""
    off = [deleted(db, driver, hv=P.SHUTDOWN) for _ in range(3)]
    running = [deleted(db, driver) for _ in range(3)]
    task = reaper(db, driver, "shutdown", max_per_run=3)
    runs = [task.run() for _ in range(2)]
    assert all(driver.domains[i.domain_name].state == P.SHUTDOWN for i in off + running)
    assert sum(s.shut_down for s in runs) == 3 and sum(s.already_off for s in runs) == 3
    # reap: two domains listed first whose destroy fails, bound 2: the third is reaped.
    hv = FakeDriver()
    hv.init_host("h1")
    stuck = [deleted(db, hv) for _ in range(2)]
    deleted(db, hv)
    hv.inject_fault("destroy", names={i.domain_name for i in stuck})
    task = reaper(db, hv, "reap", max_per_run=2)
    for _ in range(3):
        task.run()
    assert {i.domain_name for i in stuck} == set(hv.domains)
    assert task.totals["reaped"] == 1


def test_an_instance_whose_lock_is_taken_is_skipped(db, driver):
    busy, free = deleted(db, driver), deleted(db, driver)
    locks = KeyedLocks()
    task = reaper(db, driver, locks=locks)
    with locks.lock(busy.uuid):
        summary = task.run()
    assert (summary.found, summary.skipped, summary.reaped) == (2, 1, 1)
    assert busy.domain_name in driver.domains and free.domain_name not in driver.domains
    assert task.run().reaped == 1  # the next run gets it


def test_errors_are_counted_and_never_end_the_run(db, driver, caplog):
    bad, good = deleted(db, driver), deleted(db, driver)
    driver.inject_fault("destroy", names={bad.domain_name})
    summary = reaper(db, driver).run()
    assert (summary.found, summary.reaped, summary.errors, summary.aborted) == (2, 1, 1, None)
    assert bad.domain_name in driver.domains and good.domain_name not in driver.domains
    assert audit(db, bad) == [] and len(audit(db, good)) == 1
    assert any("injected fault in destroy" in r.getMessage() for r in caplog.records)


def test_the_hypervisor_going_away_aborts_the_run(db, driver):
    deleted(db, driver)
    driver.inject_fault("list_domains", error=exception.HypervisorUnavailable("libvirt gone"))
    summary = reaper(db, driver).run()
    assert summary.aborted == "hypervisor unavailable: libvirt gone"
    assert summary.found == 0


def test_the_database_going_away_aborts_the_run_under_its_own_name(db, driver, monkeypatch):
    deleted(db, driver)

    def down(*args):
        raise exception.DatabaseUnavailable("database unavailable: connection refused")

    monkeypatch.setattr(db, "instance_get_deleted_by_domain_names", down)
    summary = reaper(db, driver).run()
    assert summary.aborted == "database unavailable: connection refused"
    assert driver.calls["destroy"] == 0


def test_stopping_the_agent_ends_the_run_between_domains(db, driver):
    for _ in range(3):
        deleted(db, driver)
    stop = []
    real = driver.destroy

    def destroy_then_stop(inst):
        real(inst)
        stop.append(1)

    driver.destroy = destroy_then_stop
    summary = reaper(db, driver, should_stop=lambda: bool(stop)).run()
    assert (summary.found, summary.reaped, summary.deferred) == (3, 1, 2)
    assert summary.aborted == "agent stopping"


def test_bad_action_and_bound_are_typed_errors(db, driver):
    with pytest.raises(exception.InvalidInput, match="one of reap, shutdown, log, noop"):
        reaper(db, driver, "kill")
    for bound in (0, -1, True, "5"):
        with pytest.raises(exception.InvalidInput, match="positive integer"):
            reaper(db, driver, max_per_run=bound)


def test_deleted_rows_are_found_by_name_in_one_transaction(db):
    mine = [create_instance(db) for _ in range(3)]
    for inst in mine[:2]:
        db.instance_soft_delete(inst, source="rpc", reason="test")
    other_host = create_instance(db, host="h2")
    db.instance_soft_delete(other_host, source="rpc", reason="test")
    names = [f"junk-{i}" for i in range(1200)] + [i.domain_name for i in mine]
    names.append(other_host.domain_name)
    db.statements = 0
    found = db.instance_get_deleted_by_domain_names("h1", names)
    assert sorted(r.uuid for r in found) == sorted(i.uuid for i in mine[:2])
    assert all(r.deleted and r.host == "h1" for r in found)
    # One transaction: the pool's check, BEGIN, 3 SELECTs of 500 names, COMMIT.
    assert db.statements == 6 + db.transaction_pooling  # + SET LOCAL behind PgBouncer
    assert db.instance_get_deleted_by_domain_names("h1", []) == []


# -- options and the periodic task ------------------------------------------


def test_options_defaults_and_validation(tmp_path):
    c = load_file(tmp_path, "")
    assert c.compute.running_deleted_instance_poll_interval == 1800
    assert c.compute.running_deleted_instance_action == "reap"
    assert c.compute.running_deleted_instance_max_per_run == 50
    for text, name in (
        ("running_deleted_instance_action = kill", "running_deleted_instance_action"),
        ("running_deleted_instance_max_per_run = 0", "running_deleted_instance_max_per_run"),
        ("running_deleted_instance_poll_interval = soon", "running_deleted_instance_poll_interval"),
    ):
        with pytest.raises(exception.ConfigError) as info:
            load_file(tmp_path, f"[compute]\n{text}\n")
        assert name in str(info.value) and "\n" not in str(info.value)


@pytest.fixture
def agent(conf, sqlite_db):
    conf.set_override("stats_interval", 0, group="compute")
    conf.set_override("host", "h1")
    driver = FakeDriver()
    manager = ComputeManager(conf, sqlite_db, driver)
    service = NodeService(conf, sqlite_db, components=[manager])
    yield service, manager, driver
    service.stop()
    for name in ("stats_interval", "running_deleted_instance_poll_interval"):
        conf.clear_override(name, group="compute")


def test_the_reaper_is_a_periodic_task_with_its_figures(agent, sqlite_db, conf):
    service, manager, driver = agent
    conf.set_override("running_deleted_instance_poll_interval", 3600, group="compute")
    gone = deleted(sqlite_db, driver)
    service.start()
    task = service.runner.tasks[REAPER]
    assert task.interval == 3600 and task.enabled
    assert wait_until(lambda: task.runs >= 1)  # the first run comes at start (fuzzy delay 0)
    assert gone.domain_name not in driver.domains
    stats = manager.reaper.statistics()
    assert stats.action == "reap" and stats.runs == 1
    assert stats.totals["reaped"] == 1 and stats.last_run is not None
    assert stats.last_run["found"] == 1


def test_interval_zero_disables_the_schedule_not_the_forced_run(agent, sqlite_db, conf):
    service, manager, driver = agent
    conf.set_override("running_deleted_instance_poll_interval", 0, group="compute")
    gone = deleted(sqlite_db, driver)
    service.start()
    task = service.runner.tasks[REAPER]
    assert not task.enabled
    green.sleep(0.2)
    assert task.runs == 0 and gone.domain_name in driver.domains
    summary = manager.reap_deleted(timeout=10)
    assert summary["reaped"] == 1 and summary["domains"] == [gone.domain_name]
    assert gone.domain_name not in driver.domains and task.runs == 1


def test_stopping_the_agent_mid_run_does_not_wait_for_the_whole_run(agent, sqlite_db, conf):
    """SIGTERM during a long run: the run ends after the domain in hand, the stop is prompt."""
    service, manager, driver = agent
    conf.set_override("running_deleted_instance_poll_interval", 3600, group="compute")
    driver.method_latency["destroy"] = 0.3  # a QEMU takes seconds to die; 20 x 0.3 s here
    for _ in range(20):
        deleted(sqlite_db, driver)
    service.start()
    task = service.runner.tasks[REAPER]
    assert wait_until(lambda: driver.calls["destroy"] >= 1, timeout=10)
    started = green.monotonic()
    service.request_stop("test")
    service.stop()
    took = green.monotonic() - started
    # Well under the 6 s the run would take, and under the grace (3 s): not cancelled.
    assert took < conf.graceful_shutdown_timeout, took
    assert task.runs == 1 and task.last_error is None
    summary = task.last_result
    assert summary.aborted == "agent stopping" and summary.errors == 0
    assert summary.reaped + summary.deferred == 20 and summary.deferred > 0
    assert len(driver.domains) == summary.deferred


def test_the_forced_run_is_for_the_admin_socket_only(agent, sqlite_db):
    service, manager, driver = agent
    gone = deleted(sqlite_db, driver)
    service.start()
    dispatcher = Dispatcher(manager, service)
    with pytest.raises(exception.InvalidInput, match="unknown method"):
        dispatcher.call("reap_deleted_instances", {}, ActionSource.RPC)
    with pytest.raises(exception.InvalidInput, match="unknown argument"):
        dispatcher.call("reap_deleted_instances", {"action": "noop"}, ActionSource.CLI, admin=True)
    summary = dispatcher.call("reap_deleted_instances", {}, ActionSource.CLI, admin=True)
    assert summary["found"] in (0, 1)  # the run at start may have reaped it already
    assert gone.domain_name not in driver.domains
    status = dispatcher.call("status", {}, ActionSource.CLI, admin=True)
    assert status["running_deleted"]["totals"]["reaped"] == 1


def test_a_hung_destroy_leaves_status_answering_and_the_stop_within_its_grace(
    agent, sqlite_db, conf
):
    """libvirt stops answering mid-run: status still answers, SIGTERM still ends the agent."""
    service, manager, driver = agent
    conf.set_override("running_deleted_instance_poll_interval", 3600, group="compute")
    for _ in range(3):
        deleted(sqlite_db, driver)
    fault = driver.inject_fault("destroy", kind="hang")
    service.start()
    assert wait_until(lambda: fault.hits == 1, timeout=10)
    dispatcher = Dispatcher(manager, service)
    started = green.monotonic()
    status = dispatcher.call("status", {}, ActionSource.CLI, admin=True)
    assert green.monotonic() - started < 5
    assert status["running_deleted"]["action"] == "reap"
    started = green.monotonic()
    service.request_stop("test")
    service.stop()
    took = green.monotonic() - started
    assert took < 2 * conf.graceful_shutdown_timeout + 2, took
    driver.clear_faults()
