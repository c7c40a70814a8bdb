"""RPC end to end: two real agents (host-a, host-b) on one RabbitMQ and one PostgreSQL.

The agents run as processes with the fake driver; the test is the
scheduler, calling through ``compute_agent.rpcapi`` and, where the wire
format itself is the point, through a bare oslo.messaging client that
knows nothing of the agent's exception classes.
"""

from __future__ import annotations

import json
import signal
import time
import uuid as uuidlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import oslo_messaging
import pytest

from compute_agent import __version__, exception
from compute_agent.db import migration
from compute_agent.db.api import Database
from compute_agent.dispatch import MAX_ARGS_BYTES, SYNC_FIELDS
from compute_agent.rpc import TOPIC, VERSION
from compute_agent.rpcapi import ComputeAPI
from compute_agent.states import ActionSource, PowerState
from tests.functional.agent_process import AgentProcess
from tests.functional.rabbit import RabbitRun
from tests.helpers import create_instance

INSTANCE_FIELDS = {
    "uuid",
    "name",
    "host",
    "vm_state",
    "task_state",
    "power_state",
    "vcpus",
    "memory_mb",
    "updated_at",
}


@dataclass
class Cluster:
    a: str
    b: str
    db: Database
    api: ComputeAPI
    raw: Any  # a bare oslo RPC client: failures arrive as RemoteError
    run: RabbitRun
    agents: dict[str, AgentProcess]


def _agent_conf(path, host: str, db_url: str) -> None:
    path.write_text(
        f"[DEFAULT]\nhost = {host}\nstate_path = {path.parent}/state\ncompute_driver = fake\n"
        "report_interval = 1\nperiodic_fuzzy_delay = 0\n"
        "[compute]\nstats_interval = 1\n"
        f"[database]\nconnection = {db_url}\n"
    )


@pytest.fixture(scope="module")
def cluster(db_url_factory, tmp_path_factory) -> Iterator[Cluster]:
    run = RabbitRun()
    db_url = db_url_factory("postgresql")
    db = Database(db_url)
    migration.upgrade(db)
    agents: dict[str, AgentProcess] = {}
    api = raw_transport = None
    try:
        rabbit_conf = tmp_path_factory.mktemp("rabbit") / "rabbit.conf"
        rabbit_conf.write_text(run.conf_text())
        hosts = [run.host("host-a"), run.host("host-b")]
        for host in hosts:
            path = tmp_path_factory.mktemp(host) / "agent.conf"
            _agent_conf(path, host, db_url)
            agents[host] = AgentProcess([rabbit_conf, path])
        for agent in agents.values():
            agent.wait_for("RPC serving")
        client_conf = run.conf()
        api = ComputeAPI(client_conf, timeout=15, db=db)
        raw_transport = oslo_messaging.get_rpc_transport(client_conf)  # no exmods allowed
        raw = oslo_messaging.get_rpc_client(
            raw_transport, oslo_messaging.Target(topic=TOPIC, version=VERSION), timeout=15
        )
        yield Cluster(hosts[0], hosts[1], db, api, raw, run, agents)
        for agent in agents.values():
            agent.proc.send_signal(signal.SIGTERM)
        for agent in agents.values():
            assert agent.wait_exit() == 0, agent.output
            assert "RPC stopped" in agent.output
            # The transport URL is logged, its password never.
            assert "rabbit://guest:***@" in agent.output
            assert "guest:guest" not in agent.output
    finally:
        for agent in agents.values():
            agent.kill()
        if api is not None:
            api.close()
        if raw_transport is not None:
            raw_transport.cleanup()
        run.cleanup()
        db.dispose()


def _new_instance(name: str = "vm") -> dict[str, Any]:
    return {"uuid": str(uuidlib.uuid4()), "name": name, "vcpus": 1, "memory_mb": 64}


def _eventually(check: Callable[[], Any], timeout: float = 10) -> Any:
    """Poll ``check`` until it returns a truthy value (exceptions count as not yet)."""
    end = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < end:
        try:
            last = check()
        except exception.ComputeAgentError as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(0.05)
    raise AssertionError(f"not true within {timeout} s; last: {last!r}")


@pytest.fixture(scope="module")
def active(cluster) -> dict[str, str]:
    """One active instance on each host, built through RPC."""
    return {
        host: cluster.api.build_instance(host, _new_instance(f"active-{host}"))["uuid"]
        for host in (cluster.a, cluster.b)
    }


# -- every method, called ----------------------------------------------------


def test_ping_is_answered_by_the_host_addressed(cluster):
    for _ in range(10):
        assert cluster.api.ping(cluster.a) == {"host": cluster.a, "version": __version__}
        assert cluster.api.ping(cluster.b)["host"] == cluster.b


def test_ping_all_reaches_every_host_and_reports_the_silent_one(cluster):
    replies = cluster.api.ping_all()  # the hosts of the services table
    assert set(replies) == {cluster.a, cluster.b}
    assert all(r.ok and r.result["host"] == h for h, r in replies.items())

    ghost = f"host-ghost-{cluster.run.run_id}"
    replies = cluster.api.ping_all([cluster.a, cluster.b, ghost], timeout=1)
    assert replies[cluster.a].ok and replies[cluster.b].ok
    assert isinstance(replies[ghost].error, oslo_messaging.MessagingTimeout)
    assert replies[ghost].elapsed_s < 5


def test_every_instance_method_called(cluster, active):
    api, a, b = cluster.api, cluster.a, cluster.b
    request = _new_instance("web-1")
    uuid = request["uuid"]

    built = api.build_instance(a, request)
    assert set(built) == INSTANCE_FIELDS
    assert built["host"] == a and built["name"] == "web-1"
    assert (built["vm_state"], built["task_state"], built["power_state"]) == (
        "active",
        None,
        "running",
    )
    # Served by host-a alone: the row is host-a's, and host-b does not know it.
    assert cluster.db.instance_get(uuid).host == a
    with pytest.raises(exception.InstanceNotFound):
        api.get_instance_info(b, uuid)

    assert api.get_instance_info(a, uuid) == built
    listed = {i["uuid"]: i for i in api.list_instances(a)}
    assert listed[uuid] == built and active[a] in listed
    assert uuid not in {i["uuid"] for i in api.list_instances(b)}

    state = api.get_host_state(a)
    assert state["host"] == a and state["libvirt_connected"] is True
    assert state["service"]["up"] is True and state["service"]["disabled"] is False
    assert set(state["instances_by_power_state"]) == {p.value for p in PowerState}
    assert state["instances_by_power_state"]["running"] >= 2
    assert state["vcpus_used"] >= 2 and state["memory_mb_used"] >= 128

    stats = api.get_instance_stats(a, uuid)
    assert set(stats) == {"uuid", "stats", "taken_at", "age_s", "unresponsive"}
    assert stats["uuid"] == uuid
    stats = _eventually(lambda: (s := api.get_instance_stats(a, uuid))["stats"] and s)
    assert stats["age_s"] >= 0 and stats["stats"]["state"] == "running"

    stopped = api.stop_instance(a, uuid)
    assert (stopped["vm_state"], stopped["power_state"]) == ("stopped", "shutdown")
    started = api.start_instance(a, uuid)
    assert (started["vm_state"], started["power_state"]) == ("active", "running")
    assert api.reboot_instance(a, uuid)["vm_state"] == "active"
    assert api.reboot_instance(a, uuid, hard=True)["vm_state"] == "active"

    one = api.sync_power_states(a, uuid)
    assert set(one) == set(SYNC_FIELDS)
    assert (one["checked"], one["changed"], one["errors"]) == (1, 0, 0)

    deleted = api.delete_instance(a, uuid)
    assert deleted["vm_state"] == "deleted" and deleted["uuid"] == uuid
    with pytest.raises(exception.InstanceNotFound):
        api.get_instance_info(a, uuid)
    # Every change was recorded as coming from RPC.
    assert {row.source for row in cluster.db.actions_get(uuid)} == {ActionSource.RPC.value}


def test_casts_run_and_their_failures_are_logged(cluster):
    api, a = cluster.api, cluster.a
    request = _new_instance("cast-1")
    uuid = request["uuid"]

    def state() -> tuple:
        i = api.get_instance_info(a, uuid)
        return (i["vm_state"], i["task_state"])

    assert api.build_instance(a, request, cast=True) is None
    _eventually(lambda: state() == ("active", None))
    assert api.stop_instance(a, uuid, cast=True) is None
    _eventually(lambda: state() == ("stopped", None))
    api.start_instance(a, uuid, cast=True)
    _eventually(lambda: state() == ("active", None))
    api.reboot_instance(a, uuid, hard=True, cast=True)
    _eventually(lambda: any(r.action == "reboot_hard" for r in cluster.db.actions_get(uuid)))
    _eventually(lambda: state() == ("active", None))
    api.delete_instance(a, uuid, cast=True)
    _eventually(lambda: isinstance(_raises(lambda: api.get_instance_info(a, uuid)), Exception))

    # A cast's failure cannot reach the caller: the agent logs it.
    missing = str(uuidlib.uuid4())
    api.stop_instance(a, missing, cast=True)
    api.build_instance(a, {"uuid": "nope"}, cast=True)
    agent = cluster.agents[a]
    agent.wait_for(f"RPC cast stop_instance refused: InstanceNotFound: instance {missing}")
    agent.wait_for("RPC cast build_instance refused: InvalidInput: instance is missing")
    assert api.ping(a)["host"] == a


def _raises(fn: Callable[[], Any]) -> BaseException | None:
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - returned for the caller to judge
        return exc
    return None


# -- every error type --------------------------------------------------------

# (id, method, arguments given the active instances {host: uuid}, error type, message part)
ERRORS: list[tuple[str, str, Callable[[str], dict], str, str]] = [
    ("unknown-method", "explode", lambda u: {}, "InvalidInput", "unknown method 'explode'"),
    ("admin-only", "status", lambda u: {}, "InvalidInput", "unknown method 'status'"),
    ("private", "_forward", lambda u: {}, "InvalidInput", "unknown method '_forward'"),
    ("endpoint-attr", "target", lambda u: {}, "InvalidInput", "unknown method 'target'"),
    (
        "missing-arg",
        "get_instance_info",
        lambda u: {},
        "InvalidInput",
        "missing argument(s) instance_uuid",
    ),
    ("extra-arg", "ping", lambda u: {"verbose": True}, "InvalidInput", "unknown argument(s)"),
    (
        "extra-arg-2",
        "stop_instance",
        lambda u: {"instance_uuid": u, "force": True},
        "InvalidInput",
        "unknown argument(s) force",
    ),
    (
        "wrong-type-bool",
        "reboot_instance",
        lambda u: {"instance_uuid": u, "hard": "yes"},
        "InvalidInput",
        "hard must be true or false",
    ),
    (
        "wrong-type-instance",
        "build_instance",
        lambda u: {"instance": "web-1"},
        "InvalidInput",
        "instance must be an object",
    ),
    (
        "wrong-type-size",
        "build_instance",
        lambda u: {"instance": {**_new_instance(), "vcpus": "two"}},
        "InvalidInput",
        "vcpus",
    ),
    (
        "wrong-type-uuid",
        "get_instance_info",
        lambda u: {"instance_uuid": 42},
        "InvalidInput",
        "instance_uuid",
    ),
    (
        "invalid-uuid",
        "get_instance_info",
        lambda u: {"instance_uuid": "not-a-uuid"},
        "InvalidInput",
        "not a UUID",
    ),
    (
        "invalid-uuid-sync",
        "sync_power_states",
        lambda u: {"instance_uuid": "../etc"},
        "InvalidInput",
        "not a UUID",
    ),
    (
        "oversized",
        "build_instance",
        lambda u: {"instance": {**_new_instance("x" * (MAX_ARGS_BYTES + 10))}},
        "InvalidInput",
        f"exceed the limit of {MAX_ARGS_BYTES}",
    ),
    (
        "not-found",
        "get_instance_info",
        lambda u: {"instance_uuid": "00000000-0000-4000-8000-00000000dead"},
        "InstanceNotFound",
        "instance 00000000-0000-4000-8000-00000000dead not found",
    ),
    (
        "not-found-stats",
        "get_instance_stats",
        lambda u: {"instance_uuid": "00000000-0000-4000-8000-00000000dead"},
        "InstanceNotFound",
        "not found",
    ),
    (
        "not-found-stop",
        "stop_instance",
        lambda u: {"instance_uuid": "00000000-0000-4000-8000-00000000dead"},
        "InstanceNotFound",
        "not found",
    ),
    (
        "invalid-state",
        "start_instance",
        lambda u: {"instance_uuid": u},
        "InstanceInvalidState",
        "in vm_state active; allowed from stopped",
    ),
    (
        "already-exists",
        "build_instance",
        lambda u: {"instance": {**_new_instance(), "uuid": u}},
        "InstanceInvalidState",
        "",
    ),
]


@pytest.mark.parametrize(
    "method,make_args,exc_type,text", [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS]
)
def test_errors_reach_a_bare_oslo_client_as_one_of_four_types(
    cluster, active, method, make_args, exc_type, text
):
    args = make_args(active[cluster.a])
    with pytest.raises(oslo_messaging.RemoteError) as info:
        cluster.raw.prepare(server=cluster.a).call({}, method, **args)
    assert info.value.exc_type == exc_type
    assert text in info.value.value
    # The caller gets the type and the message, not the agent's stack.
    assert "Traceback" not in "".join(info.value.traceback or [])


@pytest.mark.parametrize(
    "method,make_args,exc_type,text", [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS]
)
def test_errors_reach_rpcapi_as_the_agents_classes(
    cluster, active, method, make_args, exc_type, text
):
    args = make_args(active[cluster.a])
    with pytest.raises(exception.ComputeAgentError) as info:
        cluster.api.call(cluster.a, method, **args)
    assert type(info.value) is getattr(exception, exc_type)
    assert text in str(info.value) and "\n" not in str(info.value)


def test_instance_of_another_host_is_not_found_here(cluster, active):
    with pytest.raises(exception.InstanceNotFound):
        cluster.api.get_instance_info(cluster.a, active[cluster.b])
    with pytest.raises(exception.InstanceNotFound):
        cluster.api.stop_instance(cluster.a, active[cluster.b])
    assert cluster.api.get_instance_info(cluster.b, active[cluster.b])["vm_state"] == "active"


# -- malformed requests ------------------------------------------------------


MALFORMED = [
    ("method-not-a-string", {"method": 123, "args": {}}, "request has no method name"),
    ("no-method", {"args": {}}, "request has no method name"),
    ("args-not-an-object", {"method": "ping", "args": [1, 2]}, "arguments must be an object"),
    ("bad-version", {"method": "ping", "args": {}, "version": "one"}, "invalid version"),
    ("newer-major", {"method": "ping", "args": {}, "version": "2.0"}, "version 2.0 is not"),
    ("newer-minor", {"method": "ping", "args": {}, "version": "1.9"}, "version 1.9 is not"),
    ("namespace", {"method": "ping", "args": {}, "namespace": "x"}, "unknown namespace"),
]


@pytest.mark.parametrize("message,text", [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_requests_get_invalid_input(cluster, message, text):
    # Below RPCClient, which would not build such messages.
    target = oslo_messaging.Target(topic=TOPIC, server=cluster.a)
    transport = cluster.raw.transport
    with pytest.raises(oslo_messaging.RemoteError) as info:
        transport._send(target, {}, message, wait_for_reply=True, timeout=10)
    assert info.value.exc_type == "InvalidInput"
    assert text in info.value.value
    assert cluster.api.ping(cluster.a)["host"] == cluster.a


def test_garbage_on_the_queue_is_dropped_and_the_server_keeps_serving(cluster):
    run, a = cluster.run, cluster.a
    run.publish_raw(a, b"\x00\xff not json", "application/json")
    run.publish_raw(a, json.dumps([1, 2, 3]), "application/json")
    run.publish_raw(
        a, json.dumps({"oslo.version": "2.0", "oslo.message": "{broken"}), "application/json"
    )
    run.publish_raw(
        a, json.dumps({"oslo.version": "9.0", "oslo.message": "{}"}), "application/json"
    )
    run.publish_raw(a, json.dumps({"method": "stop_instance"}), "application/json")  # no reply to
    run.publish_raw(a, "x" * (MAX_ARGS_BYTES * 2), "text/plain")
    for _ in range(5):
        assert cluster.api.ping(a)["host"] == a
    agent = cluster.agents[a]
    agent.wait_for("Failed to process message")
    assert agent.proc.poll() is None


# -- two hosts ---------------------------------------------------------------


def test_each_host_syncs_only_its_own_instances(cluster, active):
    api, db, a, b = cluster.api, cluster.db, cluster.a, cluster.b
    api.build_instance(b, _new_instance("b-2"))
    # A row of host-b whose domain does not exist on host-b: host-b's sync
    # corrects it, host-a's must never look at it.
    orphan = create_instance(db, host=b, vm_state="active", power_state="running")
    before = db.instance_get(orphan.uuid)

    summary_a = api.sync_power_states(a)
    assert set(summary_a) == set(SYNC_FIELDS)
    rows_a = db.instance_get_all_by_host(a)
    assert summary_a["checked"] + summary_a["skipped"] == len(rows_a)
    after_a = db.instance_get(orphan.uuid)
    assert (after_a.power_state, after_a.updated_at) == ("running", before.updated_at)

    summary_b = api.sync_power_states(b)
    rows_b = db.instance_get_all_by_host(b)
    assert summary_b["checked"] + summary_b["skipped"] == len(rows_b)
    assert summary_b["changed"] >= 1
    assert db.instance_get(orphan.uuid).power_state == "nostate"
    assert db.instance_get(active[a]).host == a
