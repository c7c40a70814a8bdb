"""The request table shared by RPC and the admin socket: shapes, errors, results."""

import sys
import uuid

import pytest

from compute_agent import __version__, exception, green
from compute_agent.dispatch import MAX_ARGS_BYTES, Dispatcher
from compute_agent.manager import ComputeManager
from compute_agent.service import NodeService
from compute_agent.states import ActionSource
from compute_agent.virt.fake import FakeDriver

RPC, CLI = ActionSource.RPC, ActionSource.CLI


@pytest.fixture
def dispatcher(conf, sqlite_db):
    conf.set_override("stats_interval", 0, group="compute")
    driver = FakeDriver()
    manager = ComputeManager(conf, sqlite_db, driver)
    service = NodeService(conf, sqlite_db, components=[manager])
    service.start()
    yield Dispatcher(manager, service)
    service.stop()


def build(d, **kw):
    payload = {"uuid": str(uuid.uuid4()), "name": "vm", "vcpus": 2, "memory_mb": 128}
    payload.update(kw)
    return d.call("build_instance", {"instance": payload}, RPC)


def test_ping_and_host_state(dispatcher):
    assert dispatcher.call("ping", {}, RPC) == {"host": "test-host", "version": __version__}
    build(dispatcher)
    build(dispatcher)
    state = dispatcher.call("get_host_state", None, RPC)
    assert state["instances"] == 2 and state["vcpus_used"] == 4 and state["memory_mb_used"] == 256
    assert state["instances_by_power_state"]["running"] == 2
    assert state["libvirt_connected"] is True
    assert state["service"]["up"] is True and state["service"]["disabled"] is False


def test_instance_flow_through_the_table(dispatcher):
    info = build(dispatcher)
    assert set(info) == {
        "uuid", "name", "host", "vm_state", "task_state", "power_state", "vcpus", "memory_mb",
        "updated_at",
    }  # fmt: skip
    uid = info["uuid"]
    assert dispatcher.call("stop_instance", {"instance_uuid": uid}, RPC)["vm_state"] == "stopped"
    assert dispatcher.call("start_instance", {"instance_uuid": uid}, RPC)["vm_state"] == "active"
    rebooted = dispatcher.call("reboot_instance", {"instance_uuid": uid, "hard": True}, RPC)
    assert rebooted["power_state"] == "running"
    assert [i["uuid"] for i in dispatcher.call("list_instances", {}, RPC)] == [uid]
    assert dispatcher.call("get_instance_info", {"instance_uuid": uid}, RPC) == rebooted
    summary = dispatcher.call("sync_power_states", {"instance_uuid": uid}, RPC)
    assert set(summary) == {"checked", "changed", "skipped", "errors", "duration_s"}
    full = dispatcher.call("sync_power_states", {}, CLI)
    assert "unknown_domains" in full  # the admin CLI gets the whole summary
    assert dispatcher.call("delete_instance", {"instance_uuid": uid}, RPC)["vm_state"] == "deleted"
    with pytest.raises(exception.InstanceNotFound):
        dispatcher.call("get_instance_info", {"instance_uuid": uid}, RPC)


@pytest.mark.parametrize(
    "method, args, error, message",
    [
        ("nope", {}, exception.InvalidInput, "unknown method 'nope'"),
        (None, {}, exception.InvalidInput, "unknown method"),
        ("status", {}, exception.InvalidInput, "unknown method 'status'"),  # admin only
        ("ping", [], exception.InvalidInput, "must be an object"),
        ("ping", {"x": 1}, exception.InvalidInput, "unknown argument"),
        ("get_instance_info", {}, exception.InvalidInput, "missing argument"),
        ("get_instance_info", {"instance_uuid": 5}, exception.InvalidInput, "not a UUID"),
        ("get_instance_info", {"instance_uuid": "'; DROP"}, exception.InvalidInput, "UUID"),
        (
            "get_instance_info",
            {"instance_uuid": str(uuid.uuid4())},
            exception.InstanceNotFound,
            "not found",
        ),
        ("build_instance", {"instance": "x" * (MAX_ARGS_BYTES + 1)},
         exception.InvalidInput, "exceed"),
        ("build_instance", {"instance": {"uuid": 1}}, exception.InvalidInput, "missing"),
        ("reboot_instance", {"instance_uuid": str(uuid.uuid4()), "hard": "no"},
         exception.InvalidInput, "hard must be"),
    ],
)  # fmt: skip
def test_bad_requests_get_typed_errors(dispatcher, method, args, error, message):
    with pytest.raises(error, match=message):
        dispatcher.call(method, args, RPC)


def test_wrong_state_and_duplicate_build(dispatcher):
    info = build(dispatcher)
    with pytest.raises(exception.InstanceInvalidState):
        dispatcher.call("start_instance", {"instance_uuid": info["uuid"]}, RPC)
    with pytest.raises(exception.InstanceInvalidState):
        build(dispatcher, uuid=info["uuid"])


def test_hypervisor_gone(dispatcher):
    info = build(dispatcher)
    dispatcher.manager.driver.disconnect()
    with pytest.raises(exception.HypervisorUnavailable):
        dispatcher.call("stop_instance", {"instance_uuid": info["uuid"]}, RPC)


def test_status_for_the_admin(dispatcher):
    status = dispatcher.call("status", {}, CLI, admin=True)
    assert {t["name"] for t in status["periodic_tasks"]} >= {"heartbeat", "power_sync"}
    assert status["hub_lag"]["samples"] >= 0 and status["events"]["received"] >= 0
    assert status["builds"] == {"queued": 0, "running": 0, "completed": 0, "failed": 0}
    assert status["intake"]["slots"] == 64 and status["intake"]["waiting"] == 0
    # Which backend runs, and whether the green modules are loaded: the threads run
    # of this test proves the process holds neither.
    hub = green.BACKEND == "eventlet"
    assert status["concurrency"]["backend"] == green.BACKEND
    assert status["concurrency"]["loaded"] == {"eventlet": hub, "greenlet": hub}
    assert status["concurrency"]["switch_interval_s"] == sys.getswitchinterval()


def test_status_answers_while_the_database_is_down(dispatcher, monkeypatch):
    def down(*args, **kwargs):
        raise exception.DatabaseUnavailable("database unavailable: connection refused")

    monkeypatch.setattr(dispatcher.manager.db, "instance_counts", down)
    status = dispatcher.call("status", {}, CLI, admin=True)
    assert status["host_state"] == {
        "host": dispatcher.manager.host,
        "error": "database unavailable: connection refused",
    }
    assert status["libvirt"]["connected"] is True and status["periodic_tasks"]
    with pytest.raises(exception.DatabaseUnavailable):
        dispatcher.call("get_host_state", {}, RPC)
