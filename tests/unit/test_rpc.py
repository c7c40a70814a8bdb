"""The RPC layer's pieces that need no broker: error mapping, the endpoint, masking."""

from __future__ import annotations

import logging

import oslo_messaging
import pytest
import sqlalchemy as sa
from oslo_config import cfg

from compute_agent import exception
from compute_agent.conf import register_all
from compute_agent.log import mask_secrets
from compute_agent.periodic import TaskStopped
from compute_agent.rpc import PUBLIC_ERRORS
from compute_agent.rpc.server import ComputeEndpoint, RPCServer, public_error
from compute_agent.rpc.transport import transport_url_is_set
from compute_agent.rpcapi import _local
from compute_agent.states import ActionSource


@pytest.mark.parametrize(
    "error,expected,message",
    [
        (exception.InvalidInput("bad"), exception.InvalidInput, "bad"),
        (exception.InstanceNotFound("u-1"), exception.InstanceNotFound, "instance u-1 not found"),
        (exception.InstanceInvalidState("busy"), exception.InstanceInvalidState, "busy"),
        (exception.HypervisorUnavailable("gone"), exception.HypervisorUnavailable, "gone"),
        (exception.InstanceExists("dup"), exception.InstanceInvalidState, "dup"),
        (exception.ForeignDomain("theirs"), exception.InstanceInvalidState, "theirs"),
        (
            exception.ServiceNotFound("no row"),
            exception.HypervisorUnavailable,
            "ping failed on host h1: ServiceNotFound: no row",
        ),
        (
            sa.exc.OperationalError("SELECT 1", {}, Exception("server closed\nthe connection")),
            exception.HypervisorUnavailable,
            "ping failed on host h1: OperationalError: (builtins.Exception) server closed",
        ),
        (KeyError("x"), exception.HypervisorUnavailable, "ping failed on host h1: KeyError: 'x'"),
        (
            TaskStopped("task power_sync is stopping"),
            exception.HypervisorUnavailable,
            "host h1 is stopping: task power_sync is stopping",
        ),
    ],
)
def test_every_error_leaves_as_one_of_four_types(error, expected, message):
    public = public_error(error, "h1", "ping")
    assert type(public) is expected and type(public) in PUBLIC_ERRORS
    assert str(public) == message


class _Dispatcher:
    def __init__(self, fail: Exception | None = None) -> None:
        self.calls: list = []
        self.fail = fail

    def public(self, admin: bool) -> list[str]:
        return ["ping", "stop_instance"]

    def call(self, method, args, source, *, admin=False):
        self.calls.append((method, args, source, admin))
        if self.fail is not None:
            raise self.fail
        return {"ok": method}


def test_endpoint_forwards_keyword_arguments_as_a_dict():
    dispatcher = _Dispatcher()
    endpoint = ComputeEndpoint(dispatcher, "h1")
    # Even an argument named like the context parameter reaches the Dispatcher.
    assert endpoint.stop_instance({}, instance_uuid="u", ctxt=1) == {"ok": "stop_instance"}
    assert dispatcher.calls == [
        ("stop_instance", {"instance_uuid": "u", "ctxt": 1}, ActionSource.RPC, False)
    ]


def test_endpoint_has_only_the_public_methods():
    endpoint = ComputeEndpoint(_Dispatcher(), "h1")
    assert not hasattr(endpoint, "status")
    assert not hasattr(endpoint, "__deepcopy__")
    assert not hasattr(endpoint, "oslo_rpc_server_ping")
    assert isinstance(endpoint.target, oslo_messaging.Target)


def test_endpoint_wraps_failures_without_the_servers_stack():
    endpoint = ComputeEndpoint(_Dispatcher(fail=RuntimeError("boom")), "h1")
    with pytest.raises(oslo_messaging.ExpectedException) as info:
        endpoint.ping({})
    kind, error, tb = info.value.exc_info
    assert kind is exception.HypervisorUnavailable and tb is None
    assert error.__traceback__ is None and error.__context__ is None
    assert str(error) == "ping failed on host h1: RuntimeError: boom"


def test_rpcapi_strips_oslos_remote_wrapping():
    remote_cls = type("InvalidInput_Remote", (exception.InvalidInput,), {"__str__": lambda s: "x"})
    local = _local(remote_cls("bad input"))
    assert type(local) is exception.InvalidInput and str(local) == "bad input"
    not_found = type("InstanceNotFound_Remote", (exception.InstanceNotFound,), {})("u-1", "gone")
    local = _local(not_found)
    assert (
        type(local) is exception.InstanceNotFound and str(local) == "instance u-1 not found: gone"
    )


@pytest.mark.parametrize(
    "text,masked",
    [
        ("rabbit://guest:guest@127.0.0.1:5672/", "rabbit://guest:***@127.0.0.1:5672/"),
        (
            "on rabbit://a:p1@h1:5672,b:p2@h2:5672/vhost now",
            "on rabbit://a:***@h1:5672,b:***@h2:5672/vhost now",
        ),
        ("rabbit://h1:5672,h2:5672/", "rabbit://h1:5672,h2:5672/"),
        (
            "postgresql://u:pw@db/x and rabbit://r:pw2@q/",
            "postgresql://u:***@db/x and rabbit://r:***@q/",
        ),
        ("no url: a,b:c@d", "no url: a,b:c@d"),
    ],
)
def test_mask_secrets_masks_every_host_of_a_transport_url(text, masked):
    assert mask_secrets(text) == masked


def _conf(tmp_path, text: str | None = None) -> cfg.ConfigOpts:
    c = cfg.ConfigOpts()
    register_all(c)
    args = []
    if text is not None:
        (tmp_path / "a.conf").write_text(text)
        args = ["--config-file", str(tmp_path / "a.conf")]
    c(args, project="compute-agent")
    return c


def test_transport_url_counts_as_set_only_when_given(tmp_path):
    default = _conf(tmp_path)
    assert default.transport_url == "rabbit://"  # oslo's default: localhost, guest
    assert not transport_url_is_set(default)
    assert transport_url_is_set(_conf(tmp_path, "[DEFAULT]\ntransport_url = rabbit://\n"))
    assert not transport_url_is_set(_conf(tmp_path, "[DEFAULT]\ntransport_url =\n"))


def test_without_transport_url_the_server_says_so_and_connects_nowhere(tmp_path, caplog):
    server = RPCServer(_conf(tmp_path), dispatcher=None)  # type: ignore[arg-type]
    with caplog.at_level(logging.INFO, logger="compute_agent.rpc.server"):
        server.start(None)
        server.stop()
    lines = [r.getMessage() for r in caplog.records if r.name == "compute_agent.rpc.server"]
    assert lines == ["RPC disabled: no [DEFAULT] transport_url"]
    assert server.transport is None and not server.serving.is_set()


def test_the_server_takes_in_at_most_backlog_requests_and_the_rest_wait(tmp_path):
    """oslo acknowledges as a worker takes a message: the listener must wait for room."""
    import oslo_messaging
    from oslo_config import cfg

    from compute_agent import green
    from compute_agent.rpc.server import _BoundedRPCServer
    from compute_agent.rpc.transport import _register_global_only_opts

    conf = cfg.ConfigOpts()
    _register_global_only_opts(conf)
    conf([])
    transport = oslo_messaging.get_rpc_transport(conf, url="fake:")
    target = oslo_messaging.Target(topic="backlog", server="h1")
    taken, done, most = [0], [0], [0]

    class Endpoint:
        def work(self, ctxt, n):
            green.sleep(0.01)
            done[0] += 1

    class Counting(_BoundedRPCServer):
        def _on_incoming(self, incoming):
            taken[0] += 1
            most[0] = max(most[0], taken[0] - done[0])
            super()._on_incoming(incoming)

    server = Counting(
        transport,
        target,
        oslo_messaging.RPCDispatcher([Endpoint()], None),
        "threading",
        backlog=4,
    )
    server.start()
    client = oslo_messaging.get_rpc_client(transport, target)
    try:
        for n in range(40):
            client.cast({}, "work", n=n)
        end = green.monotonic() + 10
        while done[0] < 40 and green.monotonic() < end:
            green.sleep(0.02)
    finally:
        server.stop()
        server.wait()
        transport.cleanup()
    assert done[0] == 40
    # The fifth message is read only once one of four has finished.
    assert most[0] <= 5, most
