"""Resume after a host boot, on the fake driver: boot or restart, the bound, failures, stop."""

from __future__ import annotations

import pathlib
import threading
import uuid as uuidlib

import pytest
import sqlalchemy as sa

from compute_agent import exception, green
from compute_agent import manager as manager_mod
from compute_agent.db.models import InstanceAction
from compute_agent.dispatch import Dispatcher
from compute_agent.manager import POWER_SYNC, ComputeManager
from compute_agent.resume import BOOT_ID_FILE, BootResume, load_recorded, save_recorded
from compute_agent.service import NodeService
from compute_agent.states import ActionSource
from compute_agent.states import PowerState as P
from compute_agent.virt.events import Transition
from compute_agent.virt.fake import FakeDriver
from tests.helpers import create_instance, wait_until

OLD_BOOT = "11111111-1111-1111-1111-111111111111"
NEW_BOOT = "22222222-2222-2222-2222-222222222222"


@pytest.fixture
def boot(conf, tmp_path) -> pathlib.Path:
    """The simulated kernel boot id file, holding NEW_BOOT; the agent last saw OLD_BOOT."""
    path = tmp_path / "kernel_boot_id"
    path.write_text(NEW_BOOT + "\n")
    conf.set_override("host_boot_id_path", str(path), group="compute")
    conf.set_override("lifecycle_event_delay", 0, group="libvirt")
    conf.set_override("report_interval", 1)
    save_recorded(str(tmp_path / BOOT_ID_FILE), OLD_BOOT)
    return path


class Agent:
    def __init__(self, conf, db, driver: FakeDriver) -> None:
        self.db, self.driver = db, driver
        self.manager = ComputeManager(conf, db, driver)
        self.service = NodeService(conf, db, components=[self.manager])

    @property
    def counters(self):
        return self.manager.resume.counters

    def sync_runs(self) -> int:
        return self.service.runner.tasks[POWER_SYNC].runs

    def row(self, uid: str):
        return self.db.instance_get(uid)


@pytest.fixture
def make_agent(conf, sqlite_db):
    agents: list[Agent] = []

    def make(driver: FakeDriver | None = None) -> Agent:
        agent = Agent(conf, sqlite_db, driver or FakeDriver())
        agents.append(agent)
        return agent

    yield make
    for agent in agents:
        agent.driver.clear_faults()  # let hung native calls go
        agent.service.stop()


def guests_after_boot(db, driver: FakeDriver, count: int, state=P.SHUTDOWN) -> list[str]:
    """Instances recorded active/running whose domains a host boot left off."""
    uids = []
    for _ in range(count):
        uid = str(uuidlib.uuid4())
        create_instance(db, host="test-host", uuid=uid)
        driver.add_domain(f"instance-{uid}", uid, state)
        uids.append(uid)
    return uids


def actions(db, uid: str) -> list[tuple[str, str, str]]:
    with db.engine.connect() as c:
        rows = c.execute(
            sa.select(InstanceAction.action, InstanceAction.source, InstanceAction.reason)
            .where(InstanceAction.instance_uuid == uid)
            .order_by(InstanceAction.id)
        ).all()
    return [tuple(r) for r in rows]


def settled(agent: Agent) -> bool:
    return agent.counters.state not in ("pending", "running") and agent.sync_runs() >= 1


# -- boot or restart ----------------------------------------------------------


def test_host_boot_with_the_option_on_starts_the_guests_that_ran(conf, boot, make_agent, tmp_path):
    conf.set_override("resume_guests_state_on_host_boot", True, group="compute")
    driver = FakeDriver()
    agent = make_agent(driver)
    off = guests_after_boot(agent.db, driver, 3)
    crashed = guests_after_boot(agent.db, driver, 1, P.CRASHED)
    gone = str(uuidlib.uuid4())  # the boot took its (transient) domain: re-created
    create_instance(agent.db, host="test-host", uuid=gone)
    running = guests_after_boot(agent.db, driver, 1, P.RUNNING)  # autostarted: left alone
    stopped = str(uuidlib.uuid4())  # stopped before the boot: stays stopped
    create_instance(
        agent.db, host="test-host", uuid=stopped, vm_state="stopped", power_state="shutdown"
    )
    driver.add_domain(f"instance-{stopped}", stopped, P.SHUTDOWN)
    agent.service.start()
    assert wait_until(lambda: settled(agent), 20)
    for uid in [*off, *crashed, gone, *running]:
        row = agent.row(uid)
        assert (row.vm_state, row.power_state, row.task_state) == ("active", "running", None), uid
        assert driver.domains[f"instance-{uid}"].state is P.RUNNING
    assert agent.row(stopped).vm_state == "stopped"
    assert driver.domains[f"instance-{stopped}"].state is P.SHUTDOWN
    for uid in [*off, *crashed, gone]:
        audit = actions(agent.db, uid)
        resume = [a for a in audit if a[0] == "resume"]
        assert resume and all(a[1] == "startup" for a in resume), audit
        assert any("host boot" in (a[2] or "") for a in resume), audit
    assert any("re-created" in (a[2] or "") for a in actions(agent.db, gone))
    assert not [a for a in actions(agent.db, running[0]) if a[0] == "resume"]
    counters = agent.counters
    assert (counters.was_boot, counters.state, counters.candidates) == (True, "done", 6)
    assert (counters.resumed, counters.failed, counters.skipped) == (5, 0, 1)
    assert counters.duration_s is not None
    assert load_recorded(str(tmp_path / BOOT_ID_FILE)) == NEW_BOOT
    status = agent.manager.resume.as_dict()
    assert status["resumed"] == 5 and status["was_boot"] is True


def test_host_boot_with_the_option_off_records_them_stopped(conf, boot, make_agent, tmp_path):
    driver = FakeDriver()
    agent = make_agent(driver)
    uids = guests_after_boot(agent.db, driver, 3)
    agent.service.start()
    assert wait_until(lambda: settled(agent), 20)
    for uid in uids:
        assert agent.row(uid).vm_state == "stopped"
        assert driver.domains[f"instance-{uid}"].state is P.SHUTDOWN
    assert (agent.counters.was_boot, agent.counters.state, agent.counters.resumed) == (
        True,
        "off",
        0,
    )
    assert load_recorded(str(tmp_path / BOOT_ID_FILE)) == NEW_BOOT


@pytest.mark.parametrize("recorded", [NEW_BOOT, None], ids=["agent-restart", "first-start"])
def test_no_host_boot_leaves_the_sync_as_today(conf, boot, make_agent, tmp_path, recorded):
    conf.set_override("resume_guests_state_on_host_boot", True, group="compute")
    record = tmp_path / BOOT_ID_FILE
    if recorded is None:
        record.unlink()  # first start on this host: not taken for a boot
    else:
        save_recorded(str(record), recorded)
    driver = FakeDriver()
    agent = make_agent(driver)
    uids = guests_after_boot(agent.db, driver, 2)
    agent.service.start()
    assert wait_until(lambda: settled(agent), 20)
    assert [agent.row(u).vm_state for u in uids] == ["stopped", "stopped"]
    assert (agent.counters.was_boot, agent.counters.state) == (False, "no-boot")
    assert load_recorded(str(record)) == NEW_BOOT


def test_an_unreadable_boot_id_is_no_boot(conf, boot, make_agent):
    conf.set_override("resume_guests_state_on_host_boot", True, group="compute")
    boot.unlink()
    agent = make_agent()
    agent.service.start()
    assert agent.counters.was_boot is False and not agent.manager.resume.due


def test_the_recorded_id_is_written_whole(tmp_path):
    path = str(tmp_path / "sub" / BOOT_ID_FILE)
    save_recorded(path, OLD_BOOT)
    save_recorded(path, NEW_BOOT)
    assert load_recorded(path) == NEW_BOOT
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == [BOOT_ID_FILE]


# -- the bound, failures ------------------------------------------------------


class CountingDriver(FakeDriver):
    """Counts power_on calls in flight (they block a native thread for the latency)."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self._mutex = threading.Lock()
        self.now = self.peak = 0

    def power_on(self, instance) -> None:
        with self._mutex:
            self.now += 1
            self.peak = max(self.peak, self.now)
        try:
            super().power_on(instance)
        finally:
            with self._mutex:
                self.now -= 1


def test_at_most_max_concurrent_builds_start_at_once(conf, boot, make_agent):
    conf.set_override("resume_guests_state_on_host_boot", True, group="compute")
    conf.set_override("max_concurrent_builds", 3, group="compute")
    driver = CountingDriver(method_latency={"power_on": 0.1})
    agent = make_agent(driver)
    uids = guests_after_boot(agent.db, driver, 15)
    agent.service.start()
    assert wait_until(lambda: settled(agent), 30)
    assert all(agent.row(u).power_state == "running" for u in uids)
    assert 1 < driver.peak <= 3, driver.peak
    assert 1 < agent.counters.max_in_flight <= 3
    assert agent.counters.resumed == 15


def test_a_failing_guest_is_counted_and_audited_and_the_pass_goes_on(conf, boot, make_agent):
    conf.set_override("resume_guests_state_on_host_boot", True, group="compute")
    driver = FakeDriver()
    agent = make_agent(driver)
    uids = guests_after_boot(agent.db, driver, 4)
    bad = uids[1]
    driver.inject_fault("power_on", error=RuntimeError("no memory"), names={f"instance-{bad}"})
    agent.service.start()
    assert wait_until(lambda: settled(agent), 20)
    counters = agent.counters
    assert (counters.state, counters.resumed, counters.failed) == ("done", 3, 1)
    assert all(agent.row(u).power_state == "running" for u in uids if u != bad)
    assert any(a[0] == "resume" and "failed" in (a[2] or "") for a in actions(agent.db, bad))
    # Then the sync records it as it is, as it would have without the option.
    assert wait_until(lambda: agent.row(bad).vm_state == "stopped", 10)
    assert agent.row(bad).task_state is None


def test_a_guest_failing_before_its_start_is_audited_too(conf, boot, make_agent):
    """A domain of the instance's name but another UUID: never touched, counted, audited."""
    conf.set_override("resume_guests_state_on_host_boot", True, group="compute")
    driver = FakeDriver()
    agent = make_agent(driver)
    good, foreign = guests_after_boot(agent.db, driver, 2)
    driver.domains[f"instance-{foreign}"].uuid = str(uuidlib.uuid4())
    agent.service.start()
    assert wait_until(lambda: settled(agent), 20)
    counters = agent.counters
    assert (counters.state, counters.resumed, counters.failed) == ("done", 1, 1)
    assert driver.domains[f"instance-{foreign}"].state is P.SHUTDOWN
    audit = actions(agent.db, foreign)
    assert any(a[0] == "resume" and "ForeignDomain" in (a[2] or "") for a in audit), audit


class LosingDriver(FakeDriver):
    """libvirtd goes away at the first start and stays away until reconnected."""

    lose = True

    def power_on(self, instance) -> None:
        if self.lose:
            self.lose = False
            self.disconnect("libvirtd went away")
        super().power_on(instance)


def test_hypervisor_lost_mid_pass_fails_it_cleanly_and_the_sync_proceeds(conf, boot, make_agent):
    conf.set_override("resume_guests_state_on_host_boot", True, group="compute")
    conf.set_override("max_concurrent_builds", 1, group="compute")
    driver = LosingDriver()
    agent = make_agent(driver)
    uids = guests_after_boot(agent.db, driver, 3)
    agent.service.start()
    assert wait_until(lambda: settled(agent), 20)
    counters = agent.counters
    assert counters.state == "failed" and "not connected" in counters.last_error, counters
    assert counters.failed == 1 and counters.resumed == 0  # no further start once it is gone
    task = agent.service.runner.tasks[POWER_SYNC]
    assert "hypervisor unavailable" in (task.last_result.aborted or "")  # it ran, and met it too
    assert agent.manager.resume.due  # retried on reconnection; the boot id is not recorded
    assert all(agent.row(u).vm_state == "active" for u in uids)
    runs = agent.sync_runs()
    driver.reconnect()
    assert wait_until(lambda: agent.counters.state == "done" and agent.sync_runs() > runs, 20)
    assert agent.counters.resumed == 3 and not agent.manager.resume.due
    assert all(agent.row(u).power_state == "running" for u in uids)


# -- the sync waits; a stop ends both -----------------------------------------


def test_the_first_sync_waits_for_the_pass_then_proceeds(conf, boot, make_agent):
    conf.set_override("resume_guests_state_on_host_boot", True, group="compute")
    conf.set_override("max_concurrent_builds", 1, group="compute")
    driver = FakeDriver(method_latency={"power_on": 0.3})
    agent = make_agent(driver)
    uids = guests_after_boot(agent.db, driver, 4)
    agent.service.start()
    task = agent.service.runner.tasks[POWER_SYNC]
    assert wait_until(lambda: task.running, 10)  # the first sync started, and waits
    assert agent.counters.state in ("pending", "running")
    assert wait_until(lambda: task.runs >= 1, 30)
    assert agent.counters.state == "done"
    assert task.last_result.aborted is None and task.last_result.checked == 4
    assert all(agent.row(u).vm_state == "active" for u in uids)


def test_stopping_mid_pass_exits_promptly(conf, boot, make_agent):
    """A start that hangs, a sync that waits for the pass: the stop still takes seconds."""
    conf.set_override("resume_guests_state_on_host_boot", True, group="compute")
    conf.set_override("max_concurrent_builds", 2, group="compute")
    # Long: a wait that ignored the stop would be cut only by this grace.
    conf.set_override("graceful_shutdown_timeout", 15)
    driver = FakeDriver()
    agent = make_agent(driver)
    uids = guests_after_boot(agent.db, driver, 6)
    driver.inject_fault("power_on", kind="hang")
    agent.service.start()
    task = agent.service.runner.tasks[POWER_SYNC]
    assert wait_until(lambda: driver.faults["power_on"].hits == 2 and task.running, 10)
    started = green.monotonic()
    agent.service.request_stop("test")
    agent.service.stop()
    elapsed = green.monotonic() - started
    # Seen within a poll: neither the sync nor the pass waits out the grace.
    assert elapsed < 7, elapsed
    assert driver.faults["power_on"].hits == 2  # no further start began
    assert agent.counters.state == "interrupted"
    # The sync gave way without syncing: nothing was recorded stopped.
    assert all(agent.row(u).vm_state == "active" for u in uids)
    assert task.last_result is None or task.last_result.aborted


def test_the_sync_wait_sees_a_stop_within_a_poll(sqlite_db):
    resume = BootResume(
        sqlite_db,
        FakeDriver(),
        None,  # type: ignore[arg-type] - no pass runs here
        "test-host",
        enabled=True,
        state_path="/nonexistent",
        boot_id_path="/nonexistent",
        concurrency=1,
    )
    resume.due = True
    assert resume.prepare()
    stop = green.Event()
    green.spawn_after(0.3, stop.set)
    started = green.monotonic()
    assert resume.wait_done(stop.is_set, limit=10) is False  # not the limit: the stop
    assert green.monotonic() - started < 5
    resume.release()
    assert resume.wait_done(lambda: False) is True


# -- an agent killed mid-pass -------------------------------------------------


def test_a_resume_cut_by_an_agent_kill_is_resumed_by_the_next_start(
    conf, boot, make_agent, sqlite_db
):
    """SIGKILL mid-pass leaves rows active/powering-on with their domains off (or gone,
    a re-create cut short): the next start's recovery must keep them active so that the
    pass, still due, starts them; recorded stopped (or error), they were lost for good."""
    conf.set_override("resume_guests_state_on_host_boot", True, group="compute")
    driver = FakeDriver()
    off, gone = str(uuidlib.uuid4()), str(uuidlib.uuid4())
    for uid in (off, gone):
        create_instance(sqlite_db, host="test-host", uuid=uid, task_state="powering-on")
    driver.add_domain(f"instance-{off}", off, P.SHUTDOWN)
    agent = make_agent(driver)
    agent.service.start()
    assert wait_until(lambda: settled(agent), 20)
    for uid in (off, gone):
        row = agent.row(uid)
        assert (row.vm_state, row.power_state, row.task_state) == ("active", "running", None)
        assert driver.domains[f"instance-{uid}"].state is P.RUNNING
    assert agent.counters.state == "done" and agent.counters.resumed == 2


# -- the database away mid-pass -----------------------------------------------


class FlakyDb:
    """The agent's database as the pass sees it, unavailable while ``down`` is set."""

    def __init__(self, db) -> None:
        self.db, self.down, self.refused = db, True, 0

    def __getattr__(self, name):
        real = getattr(self.db, name)
        if name != "instance_get_all_by_host":
            return real

        def call(*args, **kwargs):
            if self.down:
                self.refused += 1
                raise exception.DatabaseUnavailable("database unavailable: injected")
            return real(*args, **kwargs)

        return call


def test_the_database_away_during_the_pass_holds_the_sync_and_the_pass_is_retried(
    conf, boot, make_agent, monkeypatch
):
    """A database blip as the host comes up (the rack lost power with it) failed the pass;
    only a hypervisor reconnection retried it, so the next sync recorded every guest that
    ran before the boot as stopped, for good."""
    monkeypatch.setattr(manager_mod, "RESUME_RETRY_S", 0.3, raising=False)
    conf.set_override("resume_guests_state_on_host_boot", True, group="compute")
    conf.set_override("sync_power_state_interval", 1, group="compute")
    driver = FakeDriver()
    agent = make_agent(driver)
    uids = guests_after_boot(agent.db, driver, 3)
    flaky = agent.manager.resume.db = FlakyDb(agent.db)
    agent.service.start()
    task = agent.service.runner.tasks[POWER_SYNC]
    assert wait_until(lambda: flaky.refused >= 2, 20)  # failed, and tried again
    assert task.runs == 0  # the sync waits meanwhile: it would record them stopped
    assert "database unavailable" in (agent.counters.last_error or "")
    flaky.down = False
    assert wait_until(lambda: agent.counters.state == "done" and task.runs >= 1, 20)
    for uid in uids:
        row = agent.row(uid)
        assert (row.vm_state, row.power_state) == ("active", "running"), uid
    assert agent.counters.resumed == 3 and not agent.manager.resume.due


# -- users racing the pass ----------------------------------------------------


def test_a_stop_and_a_delete_racing_the_pass_win_and_stay_won(conf, boot, make_agent):
    """Requests for guests the pass has not reached yet: a stopped guest is not started
    again, a deleted one's domain is not re-created; one in flight refuses them as busy."""
    conf.set_override("resume_guests_state_on_host_boot", True, group="compute")
    conf.set_override("max_concurrent_builds", 1, group="compute")
    driver = FakeDriver(method_latency={"power_on": 0.2})
    agent = make_agent(driver)
    uids = guests_after_boot(agent.db, driver, 8)
    ops = agent.manager.operations
    agent.service.start()
    assert wait_until(lambda: driver.calls["power_on"] >= 1, 10)
    stopped = ops.stop(uids[-1], ActionSource.RPC)
    assert stopped.vm_state == "stopped"
    ops.delete(uids[-2], ActionSource.RPC)
    assert wait_until(lambda: settled(agent), 30)
    assert agent.row(uids[-1]).vm_state == "stopped"
    assert driver.domains[f"instance-{uids[-1]}"].state is P.SHUTDOWN
    assert f"instance-{uids[-2]}" not in driver.domains
    for uid in uids[:-2]:
        assert agent.row(uid).power_state == "running", uid
    assert agent.counters.state == "done" and agent.counters.skipped == 2


# -- the hypervisor back after a start without it -------------------------------


class AbsentAtStart(FakeDriver):
    def init_host(self, host: str) -> None:
        raise exception.HypervisorUnavailable("libvirtd not up yet")


def test_the_gate_closes_before_the_reconnection_yields(conf, boot, make_agent):
    """libvirtd up after the agent (host boot order): the reconnection first wrote the
    service row (a database call: the hub runs others), and only then held the sync back;
    a sync due in that window saw the guests off and recorded them stopped."""
    conf.set_override("resume_guests_state_on_host_boot", True, group="compute")
    driver = AbsentAtStart()
    agent = make_agent(driver)
    uids = guests_after_boot(agent.db, driver, 2)
    agent.service.start()
    gate_open_at_db_write = []
    real = agent.db.service_set_disabled

    def write(*args, **kwargs):
        gate_open_at_db_write.append(agent.manager.resume._done.is_set())
        return real(*args, **kwargs)

    agent.db.service_set_disabled = write  # shadows the method on this instance
    driver.reconnect()
    assert gate_open_at_db_write == [False]
    assert wait_until(lambda: settled(agent) and agent.counters.state == "done", 20)
    assert all(agent.row(u).power_state == "running" for u in uids)


class BouncingDriver(FakeDriver):
    """libvirtd restarts under the pass: the first start loses it, a second start still
    in flight (a slow QEMU) ends only after the connection is back."""

    def __init__(self) -> None:
        super().__init__()
        self.starts = 0
        self.back = green.Event()

    def power_on(self, instance) -> None:
        self.starts += 1
        if self.starts == 1:
            green.sleep(0.1)  # the second start is under way
            self.disconnect("libvirtd restarted")
            green.spawn_after(0.1, self.reconnect)
            green.spawn_after(0.1, self.back.set)
        elif self.starts == 2:
            self.back.wait()
            green.sleep(0.3)  # finishes after the reconnection
        super().power_on(instance)


def test_a_reconnection_while_the_failed_pass_drains_still_runs_it_again(conf, boot, make_agent):
    """The reconnection came while the failed pass still waited for a start in flight: it
    found the start-up thread alive and did nothing; the pass then ended failed with nobody
    to run it again, and the reconnection's sync recorded the guests not reached stopped."""
    conf.set_override("resume_guests_state_on_host_boot", True, group="compute")
    conf.set_override("max_concurrent_builds", 2, group="compute")
    driver = BouncingDriver()
    agent = make_agent(driver)
    uids = guests_after_boot(agent.db, driver, 5)
    agent.service.start()
    assert wait_until(lambda: driver.back.is_set(), 10)
    assert wait_until(lambda: agent.counters.state == "done" and settled(agent), 20), agent.counters
    for uid in uids:
        row = agent.row(uid)
        assert (row.vm_state, row.power_state) == ("active", "running"), (uid, row.vm_state)


def test_status_answers_while_every_start_of_the_pass_hangs(conf, boot, make_agent):
    conf.set_override("resume_guests_state_on_host_boot", True, group="compute")
    conf.set_override("max_concurrent_builds", 2, group="compute")
    driver = FakeDriver()
    agent = make_agent(driver)
    guests_after_boot(agent.db, driver, 4)
    fault = driver.inject_fault("power_on", kind="hang")
    agent.service.start()
    assert wait_until(lambda: fault.hits == 2, 10)
    started = green.monotonic()
    status = Dispatcher(agent.manager, agent.service).call(
        "status", {}, ActionSource.CLI, admin=True
    )
    assert green.monotonic() - started < 5
    assert status["resume"]["state"] == "running" and status["resume"]["max_in_flight"] == 2


# -- no sync records a guest stopped while the resume is due -------------------


class HookedDb:
    """The agent's database as one component sees it; ``hook`` runs before the first
    ``instance_get_all_by_host`` it is given for."""

    def __init__(self, db, hook) -> None:
        self.db, self.hook = db, hook

    def __getattr__(self, name):
        real = getattr(self.db, name)
        if name != "instance_get_all_by_host" or self.hook is None:
            return real

        def call(*args, **kwargs):
            hook, self.hook = self.hook, None
            hook()
            return real(*args, **kwargs)

        return call


def test_a_sync_past_the_open_gate_records_no_guest_stopped(conf, boot, make_agent):
    """libvirtd up after the agent: the start-up sync passed the gate, still open, and
    only then did the reconnection close it and start the pass; the sync read the
    hypervisor after the reconnection, saw the guests off and recorded them stopped
    before the pass read them, which then had nothing to resume."""
    conf.set_override("resume_guests_state_on_host_boot", True, group="compute")
    driver = AbsentAtStart()
    agent = make_agent(driver)
    uids = guests_after_boot(agent.db, driver, 2)
    sync_done = green.Event()
    power_sync = agent.manager.power_sync
    real_run = power_sync.run

    def run():
        try:
            return real_run()
        finally:
            sync_done.set()

    power_sync.run = run  # shadows the method on this instance
    # The sync reconnects between its gate and its hypervisor read; the pass reads its
    # candidates only once that sync has ended, so it sees what the sync wrote.
    power_sync.db = HookedDb(agent.db, driver.reconnect)
    agent.manager.resume.db = HookedDb(agent.db, lambda: sync_done.wait(20))
    agent.service.start()
    assert wait_until(lambda: agent.counters.state == "done" and agent.sync_runs() >= 2, 20)
    for uid in uids:
        row = agent.row(uid)
        assert (row.vm_state, row.power_state) == ("active", "running"), uid
    assert agent.counters.resumed == 2


@pytest.mark.parametrize("path", ["recheck", "event", "forced"])
def test_no_single_instance_sync_records_a_guest_stopped_before_the_pass(
    conf, boot, make_agent, path
):
    """The steady rule's re-check, a lifecycle event's sync and a forced sync never wait
    for the gate: one that ran before the pass read its candidates recorded the guest
    stopped, and the pass then refused it as no longer active."""
    conf.set_override("resume_guests_state_on_host_boot", True, group="compute")
    driver = FakeDriver()
    agent = make_agent(driver)
    target, other = guests_after_boot(agent.db, driver, 2)
    synced = green.Event()
    manager = agent.manager
    real_sync_one = manager.power_sync.sync_one

    def sync_one(*args, **kwargs):
        try:
            return real_sync_one(*args, **kwargs)
        finally:
            synced.set()

    manager.power_sync.sync_one = sync_one  # what the re-check calls
    if manager.events is not None:
        manager.events._sync_one = sync_one
    in_pass = green.Event()

    def hold_the_pass():
        in_pass.set()
        assert synced.wait(20)

    manager.resume.db = HookedDb(agent.db, hold_the_pass)
    agent.service.start()
    assert wait_until(in_pass.is_set, 10)  # the gate is shut, the pass about to read
    if path == "recheck":
        manager.power_sync.recheck(target, 0.01)
    elif path == "event":
        driver.emit(f"instance-{target}", Transition.STOPPED)
    else:
        green.spawn(manager.power_sync.sync_one, target)
    assert wait_until(lambda: agent.counters.state == "done" and settled(agent), 20)
    assert synced.is_set()
    for uid in (target, other):
        row = agent.row(uid)
        assert (row.vm_state, row.power_state) == ("active", "running"), (uid, row.vm_state)
        assert driver.domains[f"instance-{uid}"].state is P.RUNNING
    assert agent.counters.resumed == 2
