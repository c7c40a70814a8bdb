"""The power-state sync: one rule per test, on the fake driver and every database."""

import uuid

import pytest

from compute_agent import exception, green, steady
from compute_agent.locks import KeyedLocks
from compute_agent.power_sync import PowerSync, _Call
from compute_agent.states import PowerState as P
from compute_agent.virt.fake import FakeDriver
from tests.helpers import create_instance
from tests.unit.hammer import THREADS, WRITES, hammer


def add(db, driver, vm_state="active", power="running", hv=P.RUNNING, task=None, host="h1"):
    """An instance row and, unless ``hv`` is None, its domain in state ``hv``."""
    inst = create_instance(db, host=host, vm_state=vm_state, power_state=power, task_state=task)
    if hv is not None:
        driver.add_domain(inst.domain_name, inst.uuid, hv)
    return inst


@pytest.fixture
def driver():
    d = FakeDriver()
    d.init_host("h1")
    return d


class Asked(list):
    """A :class:`Rechecks` that keeps what it is asked: (uuid, after) each."""

    def recheck(self, uuid, after):
        self.append((uuid, after))


def make_sync(db, driver, **kw):
    return PowerSync(db, driver, "h1", KeyedLocks(), **kw)


def row(db, inst):
    return db.instance_get(inst.uuid)


def test_power_state_follows_the_hypervisor_and_is_audited(db, driver):
    inst = add(db, driver, power="nostate", hv=P.RUNNING)
    summary = make_sync(db, driver).run()
    assert (summary.checked, summary.changed, summary.errors) == (1, 1, 0)
    assert row(db, inst).power_state == "running"
    (audit,) = [a for a in db.actions_get(inst.uuid) if a.action == "power_sync"]
    assert (audit.field, audit.old_value, audit.new_value, audit.source) == (
        "power_state",
        "nostate",
        "running",
        "sync",
    )


def test_nothing_is_written_when_nothing_changed(db, driver):
    for _ in range(10):
        add(db, driver)
    db.statements = 0
    summary = make_sync(db, driver).run()
    assert summary.checked == 10 and summary.changed == 0
    # The pool's check, BEGIN, the one SELECT of the host, COMMIT (+ SET LOCAL behind PgBouncer).
    assert db.statements == 4 + db.transaction_pooling


def test_statements_are_bounded_by_changes(db, driver):
    insts = [add(db, driver, power="nostate") for _ in range(30)]
    for inst in insts[:10]:
        driver.set_state(inst.domain_name, P.RUNNING)
    for inst in insts[10:]:
        driver.set_state(inst.domain_name, P.PAUSED)
    db.statements = 0
    summary = make_sync(db, driver).run()
    ran = db.statements
    assert summary.changed == 30
    audit = sum(1 for i in insts for a in db.actions_get(i.uuid) if a.action == "power_sync")
    # Counted as the server runs them: the load (check, BEGIN, SELECT,
    # COMMIT), one batch (check, BEGIN, COMMIT), an UPDATE per change and
    # an INSERT row per audit row.
    assert audit >= summary.changed
    assert ran == (4 + 3 + summary.changed + audit) + 2 * db.transaction_pooling


def test_only_this_hosts_instances_are_synced(db, driver):
    mine = add(db, driver, power="nostate")
    other = add(db, driver, power="nostate", host="h2")
    make_sync(db, driver).run()
    assert row(db, mine).power_state == "running"
    assert row(db, other).power_state == "nostate"


def test_active_shutdown_is_reread_then_stopped(db, driver):
    inst = add(db, driver, hv=P.SHUTDOWN)
    make_sync(db, driver).run()
    r = row(db, inst)
    assert (r.vm_state, r.power_state) == ("stopped", "shutdown")
    assert driver.calls["get_info"] == 2  # read, then read once more


def test_active_shutdown_that_recovers_on_reread_stays_active(db, driver):
    inst = add(db, driver, hv=P.SHUTDOWN)
    real = driver.get_info
    reads = []

    def flapping(i):
        reads.append(1)
        if len(reads) == 2:
            driver.set_state(i.domain_name, P.RUNNING)
        return real(i)

    driver.get_info = flapping
    make_sync(db, driver).run()
    assert row(db, inst).vm_state == "active"


def test_active_suspended_is_stopped_and_its_domain_forced_off(db, driver):
    inst = add(db, driver, hv=P.SUSPENDED)
    summary = make_sync(db, driver).run()
    r = row(db, inst)
    assert (r.vm_state, r.power_state) == ("stopped", "shutdown")
    assert summary.domains_stopped == 1 and driver.calls["power_off"] == 1


def test_report_mode_never_stops_a_suspended_active_guest(db, driver, caplog):
    inst = add(db, driver, hv=P.SUSPENDED)
    summary = make_sync(db, driver, action="report").run()
    r = row(db, inst)
    assert (r.vm_state, r.power_state) == ("active", "suspended")
    assert driver.domains[inst.domain_name].state is P.SUSPENDED
    assert summary.domains_stopped == 0 and driver.calls["power_off"] == 0
    assert driver.calls["destroy"] == 0
    assert "active instance is suspended on the hypervisor" in caplog.text


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("action", ["enforce", "report"])
@pytest.mark.parametrize("hv", [P.SHUTDOWN, None])
def test_suspended_shut_off_or_gone_becomes_stopped_after_the_steady_reread(db, driver, hv, action):
    inst = add(db, driver, vm_state="suspended", power="suspended", hv=P.SUSPENDED)
    if hv is None:
        driver.domains.pop(inst.domain_name)
    else:
        driver.set_state(inst.domain_name, hv)
    clock = _Clock()
    rechecks = Asked()
    sync = make_sync(
        db, driver, action=action, watch=steady.SteadyWatch(15, clock), rechecks=rechecks
    )
    sync.run()
    r = row(db, inst)
    if hv is None:
        # No domain counts at once: nothing can come back under that name.
        assert (r.vm_state, r.power_state) == ("stopped", "nostate") and not rechecks
    else:
        assert (r.vm_state, r.power_state) == ("suspended", "shutdown")  # not steady yet
        assert [u for u, _ in rechecks] == [inst.uuid] and rechecks[0][1] >= 15
        clock.now += 15
        sync.sync_one(inst.uuid)
        r = row(db, inst)
        assert (r.vm_state, r.power_state) == ("stopped", "shutdown")
    assert driver.calls["power_off"] == 0


def test_active_without_domain_gets_nostate_and_a_warning(db, driver, caplog):
    inst = add(db, driver, hv=None)
    make_sync(db, driver).run()
    r = row(db, inst)
    assert (r.vm_state, r.power_state) == ("active", "nostate")
    assert "no domain on the hypervisor" in caplog.text


def test_stopped_but_running_is_enforced(db, driver):
    inst = add(db, driver, vm_state="stopped", power="shutdown", hv=P.RUNNING)
    make_sync(db, driver, action="enforce", shutdown_timeout=0).run()
    assert driver.domains[inst.domain_name].state is P.SHUTDOWN
    assert row(db, inst).power_state == "shutdown"


def test_stopped_but_running_is_only_reported(db, driver):
    inst = add(db, driver, vm_state="stopped", power="shutdown", hv=P.RUNNING)
    make_sync(db, driver, action="report").run()
    assert driver.domains[inst.domain_name].state is P.RUNNING
    r = row(db, inst)
    assert (r.vm_state, r.power_state) == ("stopped", "running")
    assert driver.calls["power_off"] == 0


def test_paused_crashed_becomes_stopped(db, driver):
    inst = add(db, driver, vm_state="paused", power="paused", hv=P.CRASHED)
    make_sync(db, driver).run()
    assert (row(db, inst).vm_state, row(db, inst).power_state) == ("stopped", "crashed")


def test_instance_with_task_state_is_skipped(db, driver):
    inst = add(db, driver, power="nostate", task="spawning")
    summary = make_sync(db, driver).run()
    assert summary.skipped == 1 and summary.checked == 0
    assert driver.calls["get_info"] == 0
    assert row(db, inst).power_state == "nostate"


def test_a_failing_instance_is_counted_never_aborts(db, driver):
    bad = add(db, driver, power="nostate")
    good = [add(db, driver, power="nostate") for _ in range(5)]
    driver.inject_fault(
        "get_info", error=RuntimeError("qemu monitor gone"), names={bad.domain_name}
    )
    summary = make_sync(db, driver).run()
    assert summary.errors == 1 and summary.checked == 5 and summary.changed == 5
    assert all(row(db, g).power_state == "running" for g in good)
    assert summary.aborted is None


def test_foreign_domain_is_reported_and_left_alone(db, driver, caplog):
    inst = add(db, driver, hv=None)
    driver.add_domain(inst.domain_name, str(uuid.uuid4()), P.SHUTDOWN)
    summary = make_sync(db, driver).run()
    assert summary.foreign == 1 and summary.errors == 1
    assert row(db, inst).power_state == "running"  # untouched
    assert driver.calls["power_off"] == 0 and driver.calls["destroy"] == 0
    assert "not instance" in caplog.text


def test_unknown_domains_are_counted_listed_and_never_touched(db, driver):
    add(db, driver)
    driver.add_domain("stray-1", str(uuid.uuid4()), P.RUNNING)
    driver.add_domain("stray-2", str(uuid.uuid4()), P.PAUSED)
    summary = make_sync(db, driver).run()
    assert summary.unknown == 2 and summary.unknown_domains == ["stray-1", "stray-2"]
    assert driver.domains["stray-1"].state is P.RUNNING
    assert driver.calls["power_off"] == driver.calls["destroy"] == 0


@pytest.mark.parametrize("source", ["get_info", "bulk"])
def test_both_sources_reach_the_same_result(sqlite_db, driver, source):
    states = [P.RUNNING, P.PAUSED, P.SHUTDOWN, P.CRASHED, P.SUSPENDED]
    insts = [add(sqlite_db, driver, power="nostate", hv=states[i % 5]) for i in range(25)]
    summary = make_sync(sqlite_db, driver, source=source, shutdown_timeout=0).run()
    assert summary.errors == 0 and summary.checked == 25
    result = {i.uuid: row(sqlite_db, i).vm_state for i in insts}
    assert sorted(result.values()).count("stopped") == 15  # shutdown, crashed, suspended
    if source == "bulk":
        # One bulk read; per-instance reads only to re-check 10 and after 5 stops.
        assert driver.calls["get_all_states"] == 1 and driver.calls["get_info"] == 15
    else:
        assert driver.calls["get_info"] == 25 + 15


def test_default_bulk_reads_per_instance_and_yields(sqlite_db):
    driver = FakeDriver(bulk=False)
    driver.init_host("h1")
    insts = [add(sqlite_db, driver, power="nostate") for _ in range(5)]
    ticks = []
    gt = green.spawn(lambda: [ticks.append(green.yield_now()) for _ in range(100)])
    states = driver.get_power_states(insts)
    gt.kill()
    assert driver.calls["get_info"] == 5 and len(ticks) >= 4
    assert set(states.values()) == {P.RUNNING}


@pytest.mark.hub_only("one hub thread runs both; native threads are preempted anyway")
def test_sync_yields_after_every_instance(sqlite_db, driver):
    for _ in range(50):
        add(sqlite_db, driver, power="nostate")
    order = []
    original = driver.get_info

    def recording(i):
        order.append("sync")
        return original(i)

    driver.get_info = recording

    def other():
        while order.count("sync") < 50:
            order.append("other")
            green.yield_now()

    gt = green.spawn(other)
    make_sync(sqlite_db, driver, concurrency=1).run()
    gt.kill()
    syncs = [i for i, what in enumerate(order) if what == "sync"]
    # Between any two instances, the other greenthread got to run.
    assert all(
        any(order[j] == "other" for j in range(a + 1, b))
        for a, b in zip(syncs, syncs[1:], strict=False)
    )


def test_concurrency_bounds_instances_in_flight(sqlite_db):
    driver = FakeDriver(latency=0.02)
    driver.init_host("h1")
    for _ in range(40):
        add(sqlite_db, driver)
    in_flight, peak = [0], [0]
    original = driver.get_info

    def counting(i):
        in_flight[0] += 1
        peak[0] = max(peak[0], in_flight[0])
        try:
            return original(i)
        finally:
            in_flight[0] -= 1

    driver.get_info = counting
    t0 = green.monotonic()
    make_sync(sqlite_db, driver, concurrency=4).run()
    elapsed = green.monotonic() - t0
    assert peak[0] == 4
    assert elapsed < 40 * 0.02 * 0.6  # clearly parallel


def test_per_instance_lock_is_shared_with_operations(sqlite_db, driver):
    inst = add(sqlite_db, driver, power="nostate")
    sync = make_sync(sqlite_db, driver)
    held = green.Event()
    release = green.Event()

    def operation():
        with sync.locks.lock(inst.uuid):
            held.set()
            release.wait(5)

    green.spawn(operation)
    held.wait(1)
    runner = green.spawn(sync.sync_one, inst.uuid)
    green.sleep(0.1)
    assert driver.calls["get_info"] == 0  # waiting for the operation's lock
    release.set()
    summary = runner.wait()
    assert summary.changed == 1


def test_change_made_meanwhile_wins_over_the_sync(sqlite_db, driver):
    inst = add(sqlite_db, driver, power="nostate")
    original = driver.get_info

    def racing(i):
        # An operation changes the row between the sync's load and its write.
        live = sqlite_db.instance_get(i.uuid)
        sqlite_db.instance_update(live, {"task_state": "powering-off"}, action="stop", source="rpc")
        return original(i)

    driver.get_info = racing
    summary = make_sync(sqlite_db, driver).run()
    assert summary.skipped == 1 and summary.changed == 0
    r = row(sqlite_db, inst)
    assert (r.power_state, r.task_state) == ("nostate", "powering-off")


def test_enforce_rereads_the_row_before_stopping_a_domain(sqlite_db, driver):
    inst = add(sqlite_db, driver, vm_state="stopped", power="shutdown", hv=P.RUNNING)
    original = driver.get_info

    def started_meanwhile(i):
        live = sqlite_db.instance_get(i.uuid)
        sqlite_db.instance_update(live, {"vm_state": "active"}, action="start", source="rpc")
        return original(i)

    driver.get_info = started_meanwhile
    make_sync(sqlite_db, driver, shutdown_timeout=0).run()
    assert driver.calls["power_off"] == 0
    assert driver.domains[inst.domain_name].state is P.RUNNING


def test_hypervisor_loss_aborts_the_run(sqlite_db, driver):
    for _ in range(20):
        add(sqlite_db, driver, power="nostate")
    original = driver.get_info
    seen = []

    def dying(i):
        seen.append(1)
        if len(seen) == 5:
            driver.disconnect()
        return original(i)

    driver.get_info = dying
    summary = make_sync(sqlite_db, driver).run()
    assert summary.aborted and "unavailable" in summary.aborted
    assert summary.checked == 4 and len(seen) == 5


def test_stop_request_ends_the_run_early(sqlite_db, driver):
    for _ in range(20):
        add(sqlite_db, driver, power="nostate")
    stop = [False]
    original = driver.get_info

    def stopping(i):
        stop[0] = True
        return original(i)

    driver.get_info = stopping
    summary = make_sync(sqlite_db, driver, should_stop=lambda: stop[0]).run()
    assert summary.checked == 1 and summary.aborted == "agent stopping"


def test_sync_one_instance(db, driver):
    inst = add(db, driver, power="nostate")
    other = add(db, driver, power="nostate")
    summary = make_sync(db, driver).sync_one(inst.uuid)
    assert summary.changed == 1
    assert row(db, other).power_state == "nostate"
    with pytest.raises(exception.InstanceNotFound):
        make_sync(db, driver).sync_one(str(uuid.uuid4()))


def test_summary_and_progress(sqlite_db, driver):
    for _ in range(7):
        add(sqlite_db, driver)
    sync = make_sync(sqlite_db, driver)
    summary = sync.run().as_dict()
    assert set(summary) >= {"checked", "changed", "skipped", "errors", "duration_s"}
    assert sync.progress == (7, 7)


def test_a_write_meanwhile_that_leaves_the_fields_as_they_were_still_wins(db, driver):
    """An operation that set and cleared task_state between the sync's read and its
    write leaves power_state and vm_state as read, but the row's version moved on."""
    inst = add(db, driver, power="nostate")
    original = driver.get_info

    def operation_meanwhile(i):
        live = db.instance_get(i.uuid)
        db.instance_update(live, {"task_state": "rebooting"}, action="reboot", source="rpc")
        db.instance_update(live, {"task_state": None}, action="reboot", source="rpc")
        return original(i)

    driver.get_info = operation_meanwhile
    summary = make_sync(db, driver).run()
    assert (summary.changed, summary.skipped) == (0, 1)
    assert row(db, inst).power_state == "nostate"  # the next sync will look again


def test_writes_share_commits_in_batches(sqlite_db, driver, monkeypatch):
    from compute_agent import power_sync

    monkeypatch.setattr(power_sync, "WRITE_BATCH", 10)
    for _ in range(35):
        add(sqlite_db, driver, power="nostate")
    batches = []
    real = sqlite_db.instance_compare_and_set_many
    monkeypatch.setattr(
        sqlite_db,
        "instance_compare_and_set_many",
        lambda writes: batches.append(len(writes)) or real(writes),
    )
    summary = make_sync(sqlite_db, driver, concurrency=1).run()
    assert summary.changed == 35 and sum(batches) == 35
    assert max(batches) == 10 and len(batches) == 4


def test_a_single_sync_during_a_full_run_counts_only_its_own_write(sqlite_db):
    driver = FakeDriver(latency=0.005)
    driver.init_host("h1")
    insts = [add(sqlite_db, driver, power="nostate") for _ in range(40)]
    sync = make_sync(sqlite_db, driver, concurrency=2)
    full = green.spawn(sync.run)
    while sync.progress[0] < 10:
        green.sleep(0.005)
    one = sync.sync_one(insts[-1].uuid)  # an event or a forced sync, mid-run
    summary = full.wait()
    assert one.changed == 1
    assert summary.changed + one.changed == 40
    assert all(row(sqlite_db, i).power_state == "running" for i in insts)


def test_the_periodic_run_skips_an_instance_whose_lock_is_held(sqlite_db, driver):
    """An operation holds the lock for as long as it takes; the run never waits for it."""
    busy = add(sqlite_db, driver, power="nostate")
    other = add(sqlite_db, driver, power="nostate")
    sync = make_sync(sqlite_db, driver)
    held = green.Event()
    release = green.Event()

    def operation():
        with sync.locks.lock(busy.uuid):
            held.set()
            release.wait(5)

    op = green.spawn(operation)
    held.wait(1)
    started = green.monotonic()
    summary = sync.run()
    assert green.monotonic() - started < 1
    assert (summary.skipped, summary.changed) == (1, 1)
    assert row(sqlite_db, other).power_state == "running"
    assert row(sqlite_db, busy).power_state == "nostate"
    # A single-instance sync (forced, or an event) waits for the lock instead.
    waiter = green.spawn(sync.sync_one, busy.uuid)
    green.sleep(0.05)
    assert not waiter.dead
    release.set()
    op.wait()
    assert waiter.wait().changed == 1


class CountingLock:
    """A lock that counts how often it is taken."""

    def __init__(self) -> None:
        self.taken = 0
        self._lock = green.native_lock()

    def __enter__(self):
        self._lock.acquire()
        self.taken += 1
        return self

    def __exit__(self, *exc):
        self._lock.release()


def test_a_runs_counts_from_many_threads_add_up_without_a_lock_each():
    """Each worker thread counts in its own tally; the shared lock is taken once per
    thread, not once per count (under threads the run's workers queued on it)."""
    lock = CountingLock()
    call = _Call(lock=lock)

    def work(i: int) -> None:
        for _ in range(WRITES):
            call.count(checked=1, changed=i % 2)

    hammer(work)
    assert lock.taken == THREADS  # each thread's first count makes its tally
    summary = call.settle()
    assert summary.checked == THREADS * WRITES
    assert summary.changed == THREADS // 2 * WRITES
    assert call.settle().checked == THREADS * WRITES  # settled counts are not added twice
