"""Lifecycle events: each event type, the delayed STOPPED, stale events, stopping."""

import uuid

import pytest

from compute_agent import green
from compute_agent.lifecycle import LifecycleHandler
from compute_agent.locks import KeyedLocks
from compute_agent.power_sync import PowerSync
from compute_agent.states import PowerState as P
from compute_agent.virt.events import LifecycleEvent, Transition
from compute_agent.virt.fake import FakeDriver
from tests.helpers import create_instance

HOST = "h1"
DELAY = 0.3


class Agent:
    def __init__(self, db, delay=DELAY):
        self.db = db
        self.driver = FakeDriver()
        self.driver.init_host(HOST)
        self.stopping = False
        self.sync = PowerSync(db, self.driver, HOST, KeyedLocks(), action="report")
        self.synced: list[str] = []
        self.events = LifecycleHandler(self, stopped_delay=delay, is_stopping=lambda: self.stopping)
        self.driver.set_event_listener(self.events.on_event)

    def instance(self, state=P.RUNNING, vm_state="active", power="running"):
        uid = str(uuid.uuid4())
        inst = create_instance(self.db, host=HOST, uuid=uid, vm_state=vm_state, power_state=power)
        self.driver.add_domain(inst.domain_name, uid, state)
        return inst

    def sync_one(self, uid, source, **kw):
        """The handler's InstanceSync: the real sync, each call noted."""
        self.synced.append(uid)
        return self.sync.sync_one(uid, source, **kw)

    def row(self, inst):
        return self.db.instance_get(inst.uuid)

    def settle(self, timeout=3.0):
        end = green.monotonic() + timeout
        while green.monotonic() < end and self.events.pending:
            green.sleep(0.01)
        assert self.events.pending == 0


@pytest.fixture
def agent(sqlite_db):
    a = Agent(sqlite_db)
    yield a
    a.events.stop()


@pytest.mark.parametrize(
    "start, to, want_power",
    [
        (P.RUNNING, P.PAUSED, "paused"),  # PAUSED event
        (P.PAUSED, P.RUNNING, "running"),  # RESUMED event
        (P.SHUTDOWN, P.RUNNING, "running"),  # STARTED event
        # SUSPENDED event: this agent reports, so the domain is left suspended.
        (P.RUNNING, P.SUSPENDED, "suspended"),
        (P.RUNNING, P.CRASHED, "crashed"),  # CRASHED event
    ],
)
def test_each_immediate_event_syncs_the_instance(agent, start, to, want_power):
    inst = agent.instance(state=start, power=str(start))
    before = agent.driver.calls["get_info"]
    agent.driver.set_state(inst.domain_name, to)
    agent.settle()
    assert agent.row(inst).power_state == want_power
    assert agent.driver.calls["get_info"] > before  # the state was read again
    power_changes = [a for a in agent.db.actions_get(inst.uuid) if a.field == "power_state"]
    assert power_changes[0].source == "event" and power_changes[0].new_value == want_power


def test_stopped_event_waits_then_syncs(agent):
    inst = agent.instance()
    started = green.monotonic()
    agent.driver.set_state(inst.domain_name, P.SHUTDOWN)
    green.sleep(DELAY / 2)
    assert agent.row(inst).power_state == "running"  # still waiting
    agent.settle()
    assert green.monotonic() - started >= DELAY
    row = agent.row(inst)
    assert row.power_state == "shutdown" and row.vm_state == "stopped"
    assert agent.events.counters.delayed == 1 and agent.events.counters.cancelled == 0


def test_reboot_stopped_then_started_cancels_the_stop(agent):
    inst = agent.instance()
    agent.driver.set_state(inst.domain_name, P.SHUTDOWN)
    agent.driver.set_state(inst.domain_name, P.RUNNING)
    agent.settle()
    green.sleep(DELAY * 1.5)  # past the delay: the STOPPED must not fire
    assert agent.events.counters.cancelled == 1
    assert agent.synced == [inst.uuid]  # one sync, for the STARTED
    row = agent.row(inst)
    assert row.power_state == "running" and row.vm_state == "active"
    assert agent.db.actions_get(inst.uuid)[0].action == "create"  # nothing written


def test_undefined_domain_is_delayed_and_then_recorded(agent):
    inst = agent.instance()
    agent.driver.destroy(inst)  # emits STOPPED, then UNDEFINED
    agent.settle()
    assert agent.synced == [inst.uuid]  # the UNDEFINED cancelled the STOPPED, then ran
    assert agent.row(inst).power_state == "nostate"


def test_a_stale_event_changes_nothing(agent):
    inst = agent.instance()
    # The hypervisor says running; an old PAUSED event arrives late.
    agent.driver.emit(inst.domain_name, Transition.PAUSED)
    agent.settle()
    assert agent.synced == [inst.uuid]
    row = agent.row(inst)
    assert row.power_state == "running" and row.updated_at == inst.updated_at


def test_events_while_stopping_are_ignored(agent):
    inst = agent.instance()
    agent.stopping = True
    agent.driver.set_state(inst.domain_name, P.PAUSED)
    agent.settle()
    assert agent.synced == [] and agent.events.counters.ignored == 1
    assert agent.row(inst).power_state == "running"


def test_a_delayed_stop_is_dropped_when_stopping(agent):
    inst = agent.instance()
    agent.driver.set_state(inst.domain_name, P.SHUTDOWN)
    agent.events.stop()
    green.sleep(DELAY * 1.5)
    assert agent.synced == []


def test_events_for_a_busy_instance_are_coalesced(agent):
    inst = agent.instance()
    agent.driver.latency = 0.05
    for _ in range(5):
        agent.driver.emit(inst.domain_name, Transition.RESUMED)
    agent.settle()
    # The first starts at once; the four others wait as one.
    assert agent.events.counters.coalesced >= 3
    assert len(agent.synced) <= 2


def test_event_for_a_domain_that_is_not_ours(agent):
    agent.driver.add_domain("someone-else", str(uuid.uuid4()), P.RUNNING)
    agent.driver.set_state("someone-else", P.PAUSED)
    agent.settle()
    assert agent.events.counters.not_ours == 1 and agent.events.counters.errors == 0


def test_event_for_an_instance_being_operated_on_is_skipped(agent, sqlite_db):
    inst = agent.instance()
    sqlite_db.instance_update(
        inst, {"task_state": "powering-off"}, action="stop", source="rpc", record=False
    )
    agent.driver.set_state(inst.domain_name, P.PAUSED)
    agent.settle()
    assert agent.row(inst).power_state == "running"  # the operation writes it


def test_the_handler_never_blocks_the_dispatcher(agent):
    inst = agent.instance()
    agent.driver.latency = 0.5
    started = green.monotonic()
    agent.events.on_event(LifecycleEvent(inst.domain_name, inst.uuid, Transition.PAUSED))
    assert green.monotonic() - started < 0.05
    agent.settle()


def test_a_slow_enforced_stop_holds_up_no_other_event(sqlite_db):
    """A stopped instance started behind our back is stopped, outside the event slots."""
    agent = Agent(sqlite_db)
    agent.sync.action = "enforce"
    agent.sync.shutdown_timeout = 0.5
    agent.events = LifecycleHandler(
        agent.sync, stopped_delay=DELAY, concurrency=1, is_stopping=lambda: False
    )
    agent.driver.set_event_listener(agent.events.on_event)
    slow = agent.instance(state=P.SHUTDOWN, vm_state="stopped", power="shutdown")
    agent.driver.ignores_shutdown.add(slow.domain_name)  # takes the whole timeout
    other = agent.instance()
    agent.driver.set_state(slow.domain_name, P.RUNNING)  # started out of band
    green.sleep(0.05)
    started = green.monotonic()
    agent.driver.set_state(other.domain_name, P.PAUSED)
    while agent.row(other).power_state != "paused" and green.monotonic() - started < 2:
        green.sleep(0.01)
    assert green.monotonic() - started < 0.3  # not behind the 0.5 s stop
    agent.settle()
    assert agent.driver.domains[slow.domain_name].state == P.SHUTDOWN
    assert agent.row(slow).power_state == "shutdown" and agent.events.counters.stops == 1


class _Recording:
    """An InstanceSync that holds each sync until released and notes who ran it."""

    def __init__(self):
        self.release = green.Event()
        self.tasks: set[object] = set()
        self.now: dict[str, int] = {}
        self.most_at_once_per_instance = 0
        self.calls: list[str] = []
        self._lock = green.native_lock()

    def sync_one(self, uid, source, defer_stop=None):
        with self._lock:
            self.tasks.add(green.current_task())
            self.calls.append(uid)
            self.now[uid] = self.now.get(uid, 0) + 1
            self.most_at_once_per_instance = max(self.most_at_once_per_instance, self.now[uid])
        try:
            self.release.wait(5)
        finally:
            with self._lock:
                self.now[uid] -= 1


def _settle(handler, timeout=5.0):
    end = green.monotonic() + timeout
    while handler.pending and green.monotonic() < end:
        green.sleep(0.01)
    assert handler.pending == 0


def test_a_burst_of_events_is_a_queue_on_at_most_concurrency_workers():
    """200 instances' events at once start 4 workers, not a task each (a thread each on threads)."""
    syncs = _Recording()
    handler = LifecycleHandler(syncs, stopped_delay=DELAY, concurrency=4)
    uids = [str(uuid.uuid4()) for _ in range(200)]
    for uid in uids:
        handler.on_event(LifecycleEvent(f"instance-{uid}", uid, Transition.STARTED))
    assert handler.pending == 200
    syncs.release.set()
    _settle(handler)
    assert sorted(syncs.calls) == sorted(uids)
    assert 1 <= len(syncs.tasks) <= 4
    assert handler.counters.synced == 200


def test_an_instance_synced_now_gets_one_more_sync_after_and_never_two_at_once():
    syncs = _Recording()
    handler = LifecycleHandler(syncs, stopped_delay=DELAY, concurrency=4)
    uid = str(uuid.uuid4())
    handler.on_event(LifecycleEvent(f"instance-{uid}", uid, Transition.STARTED))
    end = green.monotonic() + 5
    while not syncs.calls and green.monotonic() < end:
        green.sleep(0.01)
    for _ in range(10):  # while the first sync runs: one more, queued, the rest merged into it
        handler.on_event(LifecycleEvent(f"instance-{uid}", uid, Transition.RESUMED))
    syncs.release.set()
    _settle(handler)
    assert syncs.calls == [uid, uid]
    assert syncs.most_at_once_per_instance == 1
    assert handler.counters.coalesced == 9


def _running_one(handler, syncs, uids):
    for uid in uids:
        handler.on_event(LifecycleEvent(f"instance-{uid}", uid, Transition.STARTED))
    end = green.monotonic() + 5
    while not syncs.calls and green.monotonic() < end:
        green.sleep(0.01)
    assert handler.running == 1


def test_stop_lets_the_sync_in_flight_finish_within_its_grace():
    """Not cut: the manager closes libvirt and the service the database after this."""
    syncs = _Recording()
    handler = LifecycleHandler(syncs, stopped_delay=DELAY, concurrency=1)
    _running_one(handler, syncs, [str(uuid.uuid4())])
    green.call_later(0.3, syncs.release.set, name="release")
    t0 = green.monotonic()
    handler.stop(grace=5)
    assert 0.2 < green.monotonic() - t0 < 4
    assert handler.running == 0 and handler.counters.synced == 1


def test_stop_drops_what_is_queued_and_waits_no_longer_than_its_grace(caplog):
    syncs = _Recording()
    handler = LifecycleHandler(syncs, stopped_delay=DELAY, concurrency=1)
    uids = [str(uuid.uuid4()) for _ in range(10)]
    _running_one(handler, syncs, uids)  # one runs, nine wait for the one worker
    t0 = green.monotonic()
    handler.stop(grace=0.2)
    assert green.monotonic() - t0 < 3
    assert "1 event sync(s) still running at stop" in caplog.text
    # Nothing new is taken, from the queue, a late event or a re-check.
    handler.on_event(LifecycleEvent("instance-x", uids[0], Transition.STARTED))
    handler.recheck(uids[1], 0.01)
    syncs.release.set()
    _settle(handler)
    green.sleep(0.1)
    assert syncs.calls == uids[:1]
    assert handler.counters.ignored == 10  # nine queued, one late event
