"""Instance operations: each flow's success and failure, wrong states, the build limit."""

import uuid

import pytest

from compute_agent import exception, green
from compute_agent.locks import KeyedLocks
from compute_agent.operations import InstanceOperations
from compute_agent.states import ActionSource
from compute_agent.states import PowerState as P
from compute_agent.virt.fake import FakeDriver
from tests.helpers import create_instance, wait_until

HOST = "h1"
RPC = ActionSource.RPC


def make_ops(db, driver=None, limit=10, shutdown_timeout=0):
    driver = driver or FakeDriver()
    driver.init_host(HOST)
    ops = InstanceOperations(
        db,
        driver,
        HOST,
        KeyedLocks(),
        name_template="instance-%(uuid)s",
        shutdown_timeout=shutdown_timeout,
        max_concurrent_builds=limit,
    )
    return ops, driver


def request(**overrides):
    payload = {"uuid": str(uuid.uuid4()), "name": "web-1", "vcpus": 1, "memory_mb": 64}
    payload.update(overrides)
    return payload


def history(db, uid):
    """(action, field, new_value) of every audit row, oldest first."""
    return [(a.action, a.field, a.new_value) for a in reversed(db.actions_get(uid))]


@pytest.fixture
def ops(sqlite_db):
    return make_ops(sqlite_db)


# -- build --------------------------------------------------------------------


def test_build_defines_and_starts_and_records_each_step(ops, sqlite_db):
    ops, driver = ops
    payload = request(name="web <1> & 'x'")
    inst = ops.build(payload, RPC)
    assert (inst.vm_state, inst.task_state, inst.power_state) == ("active", None, "running")
    assert inst.display_name == "web <1> & 'x'"
    assert inst.domain_name == f"instance-{payload['uuid']}"
    assert driver.domains[inst.domain_name].state == P.RUNNING
    assert history(sqlite_db, inst.uuid) == [
        ("create", "vm_state", "building"),
        ("build", "task_state", "spawning"),
        ("build", "vm_state", "active"),
        ("build", "task_state", None),
        ("build", "power_state", "running"),
    ]


@pytest.mark.parametrize("step", ["define", "start"])
def test_failed_build_cleans_up_and_goes_to_error_with_the_reason(ops, sqlite_db, step):
    ops, driver = ops
    driver.inject_fault(step, error=RuntimeError(f"no luck at {step}"))
    payload = request()
    with pytest.raises(RuntimeError):
        ops.build(payload, RPC)
    row = sqlite_db.instance_get(payload["uuid"])
    assert (row.vm_state, row.task_state) == ("error", None)
    assert driver.domains == {}
    reasons = [a.reason for a in sqlite_db.actions_get(row.uuid) if a.new_value == "error"]
    assert reasons and f"no luck at {step}" in reasons[0]


def test_a_build_that_leaves_a_domain_behind_is_cleaned_up(ops, sqlite_db):
    ops, driver = ops
    payload = request()
    name = f"instance-{payload['uuid']}"

    def half_spawn(spec):
        driver.add_domain(name, payload["uuid"], P.SHUTDOWN)
        raise exception.HypervisorUnavailable("connection lost mid-build")

    driver.spawn = half_spawn
    with pytest.raises(exception.HypervisorUnavailable):
        ops.build(payload, RPC)
    assert name not in driver.domains
    assert sqlite_db.instance_get(payload["uuid"]).vm_state == "error"


@pytest.mark.parametrize(
    "payload, message",
    [
        ("not a dict", "must be an object"),
        ({"uuid": str(uuid.uuid4())}, "missing name, vcpus, memory_mb"),
        (request(extra=1), "unknown field(s) extra"),
        (request(uuid="nope"), "not a UUID"),
        (request(name=""), "1 to 255"),
        (request(name="x" * 256), "1 to 255"),
        (request(name=5), "must be a string"),
        (request(name="a\x00b"), "control"),
        (request(vcpus="2"), "vcpus must be an integer"),
        (request(vcpus=True), "vcpus must be an integer"),
        (request(vcpus=0), "between 1 and"),
        (request(memory_mb=10**12), "between 16 and"),
    ],
)
def test_invalid_build_requests_are_refused_before_anything_happens(
    ops, sqlite_db, payload, message
):
    ops, driver = ops
    with pytest.raises(
        exception.InvalidInput, match=message.replace("(", r"\(").replace(")", r"\)")
    ):
        ops.build(payload, RPC)
    assert driver.calls["define"] == 0
    assert sqlite_db.instance_get_all_by_host(HOST) == []


def test_a_second_build_of_the_same_uuid_is_refused(ops):
    ops, driver = ops
    payload = request()
    ops.build(payload, RPC)
    with pytest.raises(exception.InstanceExists):
        ops.build(payload, RPC)
    assert driver.calls["define"] == 1


# -- stop, start, reboot --------------------------------------------------------


def built(ops, **kw):
    return ops.build(request(**kw), RPC)


def test_stop_and_start(ops, sqlite_db):
    ops, driver = ops
    inst = built(ops)
    stopped = ops.stop(inst.uuid, RPC)
    assert (stopped.vm_state, stopped.task_state, stopped.power_state) == (
        "stopped",
        None,
        "shutdown",
    )
    started = ops.start(inst.uuid, ActionSource.CLI)
    assert (started.vm_state, started.task_state, started.power_state) == (
        "active",
        None,
        "running",
    )
    rows = sqlite_db.actions_get(inst.uuid)
    assert {"stop", "start"} <= {a.action for a in rows}
    assert any(a.source == "cli" for a in rows)


def test_wrong_states_are_refused_with_a_typed_error(ops):
    ops, driver = ops
    inst = built(ops)
    with pytest.raises(exception.InstanceInvalidState, match="cannot start .* in vm_state active"):
        ops.start(inst.uuid, RPC)
    ops.stop(inst.uuid, RPC)
    with pytest.raises(exception.InstanceInvalidState, match="cannot stop"):
        ops.stop(inst.uuid, RPC)
    with pytest.raises(exception.InstanceInvalidState, match="cannot reboot"):
        ops.reboot(inst.uuid, False, RPC)
    assert driver.calls["power_on"] == 0 and driver.calls["reboot"] == 0


def test_a_busy_instance_is_refused_at_once(ops, sqlite_db):
    ops, driver = ops
    inst = built(ops)
    driver.method_latency["power_off"] = 0.3
    stopping = green.spawn(ops.stop, inst.uuid, RPC)
    # Until the stop holds the instance (database calls take their turns).
    assert wait_until(lambda: driver.calls["power_off"] >= 1)
    started = green.monotonic()
    with pytest.raises(exception.InstanceInvalidState, match="busy \\(powering-off\\)"):
        ops.reboot(inst.uuid, True, RPC)
    assert green.monotonic() - started < 0.1  # not queued behind the stop
    assert stopping.wait().vm_state == "stopped"


def test_unknown_and_invalid_uuids(ops):
    ops, _ = ops
    with pytest.raises(exception.InstanceNotFound):
        ops.stop(str(uuid.uuid4()), RPC)
    with pytest.raises(exception.InvalidInput, match="not a UUID"):
        ops.stop("../../etc", RPC)
    with pytest.raises(exception.InvalidInput, match="hard must be"):
        ops.reboot(str(uuid.uuid4()), "yes", RPC)


def test_soft_reboot_and_fallback_to_hard(ops):
    ops, driver = ops
    inst = built(ops)
    assert ops.reboot(inst.uuid, False, RPC).vm_state == "active"
    assert driver.calls["reboot"] == 1 and driver.calls["reboot_hard"] == 0
    driver.inject_fault("reboot", error=RuntimeError("guest ignores ACPI"), count=1)
    after = ops.reboot(inst.uuid, False, RPC)
    assert (after.vm_state, after.task_state, after.power_state) == ("active", None, "running")
    assert driver.calls["reboot_hard"] == 1


def test_failed_stop_clears_the_task_and_keeps_the_vm_state(ops, sqlite_db):
    ops, driver = ops
    inst = built(ops)
    driver.inject_fault("power_off", error=RuntimeError("qemu said no"))
    with pytest.raises(RuntimeError):
        ops.stop(inst.uuid, RPC)
    row = sqlite_db.instance_get(inst.uuid)
    assert (row.vm_state, row.task_state, row.power_state) == ("active", None, "running")
    assert any(
        "stop failed: RuntimeError: qemu said no" in (a.reason or "")
        for a in sqlite_db.actions_get(inst.uuid)
    )


def test_failed_start_when_the_hypervisor_is_gone(ops, sqlite_db):
    ops, driver = ops
    inst = built(ops)
    ops.stop(inst.uuid, RPC)
    driver.disconnect()
    with pytest.raises(exception.HypervisorUnavailable):
        ops.start(inst.uuid, RPC)
    row = sqlite_db.instance_get(inst.uuid)
    assert (row.vm_state, row.task_state) == ("stopped", None)


def test_start_finds_the_domain_gone_and_re_creates_it(ops, sqlite_db):
    ops, driver = ops
    inst = built(ops)
    ops.stop(inst.uuid, RPC)
    del driver.domains[inst.domain_name]
    started = ops.start(inst.uuid, RPC)
    assert (started.vm_state, started.task_state, started.power_state) == (
        "active",
        None,
        "running",
    )
    assert driver.domains[inst.domain_name].state == P.RUNNING


# -- delete -------------------------------------------------------------------


def test_delete_destroys_and_soft_deletes(ops, sqlite_db):
    ops, driver = ops
    inst = built(ops)
    gone = ops.delete(inst.uuid, RPC)
    assert (gone.vm_state, gone.task_state, gone.deleted) == ("deleted", None, True)
    assert driver.domains == {}
    with pytest.raises(exception.InstanceNotFound):
        sqlite_db.instance_get(inst.uuid)
    with pytest.raises(exception.InstanceNotFound):
        ops.delete(inst.uuid, RPC)


def test_delete_without_a_domain_and_of_an_errored_instance(ops, sqlite_db):
    ops, driver = ops
    inst = create_instance(sqlite_db, host=HOST, vm_state="error", power_state="nostate")
    assert ops.delete(inst.uuid, RPC).deleted


def test_delete_never_touches_a_foreign_domain(ops, sqlite_db):
    ops, driver = ops
    inst = create_instance(sqlite_db, host=HOST)
    driver.add_domain(inst.domain_name, str(uuid.uuid4()), P.RUNNING)
    ops.delete(inst.uuid, RPC)
    assert driver.domains[inst.domain_name].state == P.RUNNING


def test_failed_delete_goes_to_error(ops, sqlite_db):
    ops, driver = ops
    inst = built(ops)
    driver.inject_fault("destroy", error=RuntimeError("device busy"))
    with pytest.raises(RuntimeError):
        ops.delete(inst.uuid, RPC)
    row = sqlite_db.instance_get(inst.uuid)
    assert (row.vm_state, row.task_state) == ("error", None)
    driver.clear_faults()
    assert ops.delete(inst.uuid, RPC).deleted  # and can be deleted again


# -- the build limit ----------------------------------------------------------


def test_builds_beyond_the_limit_wait_in_a_visible_queued_state(sqlite_db):
    driver = FakeDriver(method_latency={"define": 0.1, "start": 0.1})
    ops, driver = make_ops(sqlite_db, driver, limit=2)
    payloads = [request() for _ in range(6)]
    peak = 0
    builds = [green.spawn(ops.build, p, RPC) for p in payloads]

    def states() -> list:
        return sorted(r.task_state for r in sqlite_db.instance_get_all_by_host(HOST))

    # Until two builds hold their turn and four wait (their rows say so).
    assert wait_until(lambda: states() == ["queued"] * 4 + ["spawning"] * 2), states()
    assert ops.builds.queued == 4 and ops.builds.running == 2
    while any(not b.dead for b in builds):
        peak = max(peak, ops.builds.running)
        green.sleep(0.01)
    assert peak == 2
    assert all(r.vm_state == "active" for r in sqlite_db.instance_get_all_by_host(HOST))
    assert ops.builds.completed == 6 and ops.builds.queued == 0


def test_no_limit_when_zero(sqlite_db):
    driver = FakeDriver(method_latency={"define": 0.1, "start": 0.1})
    ops, driver = make_ops(sqlite_db, driver, limit=0)
    builds = [green.spawn(ops.build, request(), RPC) for _ in range(8)]
    assert wait_until(lambda: ops.builds.running == 8)
    assert ops.builds.queued == 0
    for b in builds:
        b.wait()


def test_a_queued_build_can_be_deleted_and_then_gives_up(sqlite_db):
    driver = FakeDriver(method_latency={"define": 0.2})
    ops, driver = make_ops(sqlite_db, driver, limit=1)
    first, second = request(), request()
    b1 = green.spawn(ops.build, first, RPC)
    b2 = green.spawn(ops.build, second, RPC)
    assert wait_until(lambda: ops.builds.queued == 1)
    assert sqlite_db.instance_get(second["uuid"]).task_state == "queued"
    ops.delete(second["uuid"], RPC)
    b1.wait()
    with pytest.raises(exception.InstanceInvalidState, match="deleted while its build was queued"):
        b2.wait()
    assert driver.calls["define"] == 1
