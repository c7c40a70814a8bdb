"""RPC with the server in the test process, where its driver can be broken and slowed.

The service, manager and RPC server run as the agent runs them (green,
real RabbitMQ, real PostgreSQL), but the test holds the FakeDriver, so it
can take the hypervisor away, make a call fail unexpectedly, make a sync
slow, or hang an operation while the agent stops.
"""

from __future__ import annotations

import logging
import urllib.parse
import uuid as uuidlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import oslo_messaging
import pytest

from compute_agent import exception, green
from compute_agent.db import migration
from compute_agent.db.api import Database
from compute_agent.dispatch import Dispatcher
from compute_agent.manager import ComputeManager
from compute_agent.rpc import TOPIC, VERSION
from compute_agent.rpc import server as server_module
from compute_agent.rpc.server import RPCServer
from compute_agent.rpcapi import ComputeAPI
from compute_agent.service import NodeService
from compute_agent.virt.fake import FakeDriver
from tests.functional.frozen_proxy import FrozenProxy
from tests.functional.rabbit import TRANSPORT_URL, RabbitRun
from tests.helpers import create_instance, wait_until


@dataclass
class Node:
    host: str
    db: Database
    driver: FakeDriver
    service: NodeService
    rpc: RPCServer
    api: ComputeAPI


@pytest.fixture(scope="module")
def rabbit() -> Iterator[RabbitRun]:
    run = RabbitRun()
    yield run
    run.cleanup()


@pytest.fixture(scope="module")
def pg_url(db_url_factory) -> str:
    url = db_url_factory("postgresql")
    db = Database(url)
    migration.upgrade(db)
    db.dispose()
    return url


@pytest.fixture
def make_node(rabbit, pg_url, tmp_path) -> Iterator[Callable[..., Node]]:
    """Start an agent in this process; stopped (if not already) after the test."""
    nodes: list[Node] = []

    def make(
        driver: FakeDriver | None = None,
        *,
        serve: bool = True,
        compute: dict | None = None,
        **overrides,
    ) -> Node:
        host = rabbit.host(f"inproc-{uuidlib.uuid4().hex[:6]}")
        settings = {"state_path": str(tmp_path), "graceful_shutdown_timeout": 1.0, **overrides}
        path = tmp_path / f"{host}.conf"
        lines = [f"{k} = {v}" for k, v in {"stats_interval": -1, **(compute or {})}.items()]
        path.write_text("[compute]\n" + "\n".join(lines) + "\n")
        conf = rabbit.conf(host, path, **settings)
        db = Database(pg_url)
        driver = driver or FakeDriver()
        manager = ComputeManager(conf, db, driver)
        service = NodeService(conf, db, components=[manager])
        rpc = RPCServer(conf, Dispatcher(manager, service))
        service.components.append(rpc)
        service.start()
        if serve:
            assert rpc.serving.wait(10), "RPC server did not start"
        api = ComputeAPI(rabbit.conf(), timeout=10)
        node = Node(host, db, driver, service, rpc, api)
        nodes.append(node)
        return node

    yield make
    for node in nodes:
        node.driver.clear_faults()
        node.service.stop()
        node.api.close()


def _build(node: Node, name: str = "vm") -> str:
    uuid = str(uuidlib.uuid4())
    node.api.build_instance(node.host, {"uuid": uuid, "name": name, "vcpus": 1, "memory_mb": 64})
    return uuid


def _raw_call(node: Node, method: str, **kwargs):
    """Call as a client that does not know the agent's exception classes."""
    transport = oslo_messaging.get_rpc_transport(node.service.conf)
    try:
        client = oslo_messaging.get_rpc_client(
            transport, oslo_messaging.Target(topic=TOPIC, server=node.host, version=VERSION)
        )
        return client.call({}, method, **kwargs)
    finally:
        transport.cleanup()


def test_hypervisor_unavailable(make_node):
    node = make_node()
    uuid = _build(node)
    node.driver.disconnect()
    with pytest.raises(exception.HypervisorUnavailable, match="not connected"):
        node.api.stop_instance(node.host, uuid)
    with pytest.raises(exception.HypervisorUnavailable):
        node.api.build_instance(
            node.host, {"uuid": str(uuidlib.uuid4()), "name": "x", "vcpus": 1, "memory_mb": 64}
        )
    with pytest.raises(oslo_messaging.RemoteError) as info:
        _raw_call(node, "reboot_instance", instance_uuid=uuid, hard=True)
    assert info.value.exc_type == "HypervisorUnavailable"
    # The host still answers, and says why it cannot do more.
    state = node.api.get_host_state(node.host)
    assert state["libvirt_connected"] is False
    assert state["service"]["disabled_reason"].startswith("AUTO:")
    node.driver.reconnect()
    assert node.api.stop_instance(node.host, uuid)["vm_state"] == "stopped"


def test_unexpected_failure_is_logged_and_sent_as_hypervisor_unavailable(make_node, caplog):
    node = make_node()
    uuid = _build(node)
    node.driver.inject_fault("power_off", error=RuntimeError("virDomainShutdown exploded"))
    with caplog.at_level(logging.ERROR, logger="compute_agent.rpc.server"):
        with pytest.raises(exception.HypervisorUnavailable) as info:
            node.api.stop_instance(node.host, uuid)
    assert str(info.value) == (
        f"stop_instance failed on host {node.host}: RuntimeError: virDomainShutdown exploded"
    )
    logged = [r for r in caplog.records if "stop_instance failed unexpectedly" in r.message]
    assert logged and logged[0].exc_info[0] is RuntimeError
    assert node.api.ping(node.host)["host"] == node.host


def test_foreign_domain_is_sent_as_invalid_state(make_node):
    node = make_node()
    uuid = _build(node)
    name = f"instance-{uuid}"
    node.driver.domains[name].uuid = str(uuidlib.uuid4())  # someone else's domain now
    with pytest.raises(exception.InstanceInvalidState, match="has UUID"):
        node.api.stop_instance(node.host, uuid)


def test_a_long_call_does_not_hold_up_ping(make_node):
    latency = 0.05
    node = make_node(
        FakeDriver(method_latency={"get_info": latency}),
        compute={"sync_power_state_concurrency": 1},
    )
    count = 30
    for _ in range(count):
        inst = create_instance(node.db, host=node.host)
        node.driver.add_domain(inst.domain_name, inst.uuid)
    sync = green.spawn(node.api.sync_power_states, node.host, timeout=60)
    green.sleep(0.2)  # the sync is under way
    pings = []
    while not sync.dead:
        t0 = green.monotonic()
        assert node.api.ping(node.host)["host"] == node.host
        pings.append(green.monotonic() - t0)
        green.sleep(0.05)
    summary = sync.wait()
    assert summary["checked"] == count and summary["duration_s"] >= count * latency * 0.9
    assert len(pings) >= 5
    assert max(pings) < 0.5, pings


def test_without_transport_url_the_agent_runs_and_says_so_once(make_node, caplog):
    with caplog.at_level(logging.INFO):
        node = make_node(serve=False, transport_url=None)
        green.sleep(0.1)
        assert node.service.heartbeat() >= 1
        node.service.stop()
    said = [
        r for r in caplog.records if r.getMessage() == "RPC disabled: no [DEFAULT] transport_url"
    ]
    assert len(said) == 1
    assert not node.rpc.serving.is_set() and node.rpc.transport is None


def test_unreachable_broker_neither_blocks_start_nor_stop(make_node, caplog):
    t0 = green.monotonic()
    with caplog.at_level(logging.INFO):
        node = make_node(serve=False, transport_url="rabbit://guest:s3cret@127.0.0.1:1/")
        assert green.monotonic() - t0 < 5
        green.sleep(0.2)
        assert not node.rpc.serving.is_set()
        assert node.service.heartbeat() >= 1
        t1 = green.monotonic()
        node.service.stop()
        assert green.monotonic() - t1 < 4
        # The task trying the broker ends too: under threads, one inside
        # oslo's own retry loop could not be cancelled and went on for ever.
        starter = node.rpc._starter
        assert starter is not None and wait_until(starter.done, 5)
    text = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("compute_agent"))
    assert "RPC connecting to rabbit://guest:***@127.0.0.1:1/" in text
    assert "RPC broker rabbit://guest:***@127.0.0.1:1/ not reachable: " in text
    retried = [r for r in caplog.records if r.getMessage().startswith("Connection failed")]
    assert not retried, retried[0].getMessage()
    assert "s3cret" not in text


def _broker_address() -> tuple[str, int]:
    url = urllib.parse.urlsplit(TRANSPORT_URL)
    assert url.hostname is not None and url.port is not None
    return url.hostname, url.port


def _through(proxy: FrozenProxy) -> str:
    """The run's broker URL, sent through ``proxy``."""
    url = urllib.parse.urlsplit(TRANSPORT_URL)
    host, port = _broker_address()
    return url._replace(
        netloc=url.netloc.replace(f"{host}:{port}", f"127.0.0.1:{proxy.port}")
    ).geturl()


def test_a_silent_broker_is_waited_for_and_served_once_it_answers(make_node):
    """A broker that takes connections and says nothing (hung, a dropped path), then answers."""
    with FrozenProxy(*_broker_address(), frozen=True) as proxy:
        node = make_node(serve=False, transport_url=_through(proxy))
        green.sleep(1.0)
        assert not node.rpc.serving.is_set()
        assert node.service.heartbeat() >= 1  # the agent runs meanwhile
        proxy.thaw()
        # The probe in flight goes on (the proxy forwards what it held); then
        # the duplicate-host check's 3 s and the server's start.
        thawed = green.monotonic()
        assert node.rpc.serving.wait(30)
        print(f"\nserving {green.monotonic() - thawed:.2f} s after the thaw")
        assert node.api.ping(node.host)["host"] == node.host
        node.service.stop()


def test_stopped_while_its_broker_is_silent_the_agent_leaves_no_task_behind(make_node, caplog):
    with FrozenProxy(*_broker_address(), frozen=True) as proxy:
        node = make_node(serve=False, transport_url=_through(proxy))
        green.sleep(0.5)  # inside the first probe
        t0 = green.monotonic()
        node.service.stop()
        assert green.monotonic() - t0 < 4
        starter = node.rpc._starter
        # A probe in flight gives up after its 5 s timeout; the task then sees its cancel.
        assert starter is not None and wait_until(starter.done, 15)
        assert not node.rpc.serving.is_set()


def test_a_broker_gone_silent_while_serving_holds_the_stop_only_so_long(make_node, caplog):
    """Each connection's close waited a minute for a frozen broker: a stop took 121 s."""
    with FrozenProxy(*_broker_address()) as proxy:
        node = make_node(transport_url=_through(proxy))
        assert node.api.ping(node.host)["host"] == node.host
        proxy.freeze()
        t0 = green.monotonic()
        with caplog.at_level(logging.WARNING, logger="compute_agent.rpc.server"):
            node.service.stop()
        took = green.monotonic() - t0
        print(f"\nstop with the broker frozen: {took:.2f} s")
        # The drain's grace (1 s), the close's 3 s, and a loaded machine's slack.
        assert took < 1.0 + server_module.CLOSE_TIMEOUT_S + 4, took
    assert "(broker not answering?); stopping anyway" in caplog.text
    assert "RPC connections not closed after 3.0 s" in caplog.text


def test_stop_waits_for_requests_in_flight_only_so_long(make_node, caplog):
    node = make_node()
    uuid = _build(node)
    node.driver.inject_fault("power_off", kind="hang")
    node.api.stop_instance(node.host, uuid, cast=True)
    deadline = green.monotonic() + 5
    while node.db.instance_get(uuid).task_state != "powering-off":
        assert green.monotonic() < deadline
        green.sleep(0.02)
    t0 = green.monotonic()
    with caplog.at_level(logging.WARNING, logger="compute_agent.rpc.server"):
        node.service.stop()
    assert green.monotonic() - t0 < node.service.conf.graceful_shutdown_timeout * 2 + 3
    assert "RPC requests still running after 1.0 s (1); stopping anyway" in caplog.text
