"""One error model: the tree of categories, and its one mapping at each front door."""

from __future__ import annotations

import ast
import os
import pathlib
import re
import shutil
import tempfile

import oslo_messaging
import pytest
from oslo_messaging._drivers import common as oslo_common

from compute_agent import exception, periodic
from compute_agent.admin.client import AdminClient
from compute_agent.admin.server import AdminSocketServer
from compute_agent.dispatch import Dispatcher
from compute_agent.exception import RemoteError
from compute_agent.locks import KeyedLocks
from compute_agent.manager import ComputeManager
from compute_agent.power_sync import PowerSync
from compute_agent.rpc import PUBLIC_ERRORS
from compute_agent.rpc.server import ComputeEndpoint
from compute_agent.rpcapi import _local
from compute_agent.service import NodeService
from compute_agent.states import PowerState
from compute_agent.virt.fake import FakeDriver
from tests.helpers import create_instance

E = exception

CATEGORIES = {
    E.InvalidInput: [
        E.InvalidInput,
        E.ConfigError,
        E.BackendChoiceError,
        E.ColumnError,
        E.RequestTimeout,
    ],
    E.StateError: [
        E.InstanceNotFound,
        E.InstanceInvalidState,
        E.InstanceExists,
        E.ForeignDomain,
        E.ServiceNotFound,
        E.ServiceOwned,
        E.OwnershipLost,
        E.OwnedElsewhere,
        E.SchemaError,
        E.AdminSocketError,
        E.MetricsBindError,
    ],
    E.Unavailable: [
        E.HypervisorUnavailable,
        E.DatabaseUnavailable,
        E.AgentUnreachable,
        E.AgentTimeout,
        E.TooManyConnections,
        E.Evicted,
    ],
    E.Stopping: [E.TaskStopped],
    E.AdminCallError: [E.ClientError, E.ProtocolError, E.RemoteError],
}
PACKAGE = pathlib.Path(exception.__file__).parent


def test_every_error_is_in_exactly_one_category():
    for base, members in CATEGORIES.items():
        assert issubclass(base, E.ComputeAgentError)
        for cls in members:
            assert issubclass(cls, base)
            others = [b for b in CATEGORIES if b is not base]
            assert not any(issubclass(cls, b) for b in others), cls


def _exception_classes(tree: ast.Module, known: set[str]) -> list[str]:
    """Classes in ``tree`` whose base is an exception class (by name)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            bases = {
                b.attr if isinstance(b, ast.Attribute) else getattr(b, "id", "") for b in node.bases
            }
            if any(b in known or b.endswith(("Error", "Exception")) for b in bases):
                found.append(node.name)
    return found


def test_every_public_exception_class_lives_in_the_tree():
    """Only a private class (``_TooSlow``, in a private module) may live outside exception.py."""
    known = {n for n, v in vars(E).items() if isinstance(v, type) and issubclass(v, BaseException)}
    outside = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "exception.py" or path.name.startswith("_") and path.name != "__init__.py":
            continue
        names = _exception_classes(ast.parse(path.read_text()), known | {"BaseException"})
        outside += [f"{path.relative_to(PACKAGE)}:{n}" for n in names if not n.startswith("_")]
    assert outside == []


def test_the_documented_tree_names_every_class_in_the_module():
    documented = set(re.findall(r"^    [│├└─ ]*([A-Z][A-Za-z]+)", exception.__doc__ or "", re.M))
    defined = {
        n
        for n, v in vars(E).items()
        if isinstance(v, type) and issubclass(v, BaseException) and v.__module__ == E.__name__
    }
    assert documented == defined


def test_the_classes_outside_the_categories_keep_their_kind():
    # Neither an entry point's exit nor a bug may be taken for one of the agent's refusals.
    assert not issubclass(E.Fatal, E.ComputeAgentError)
    assert issubclass(E.PolicyGap, LookupError) and not issubclass(E.PolicyGap, E.ComputeAgentError)
    assert E.Fatal("x").status == 1 and E.Fatal("x", 2).status == 2
    assert issubclass(E.ColumnError, ValueError)
    remote = E.RemoteError("InvalidInput", "bad name")
    assert (str(remote), remote.type, remote.message) == (
        "InvalidInput: bad name",
        "InvalidInput",
        "bad name",
    )


def test_a_database_outage_is_not_a_hypervisor_outage():
    assert not issubclass(E.DatabaseUnavailable, E.HypervisorUnavailable)
    assert not issubclass(E.HypervisorUnavailable, E.DatabaseUnavailable)


def test_a_foreign_domain_is_no_invalid_state_and_the_row_errors_are_no_instance_errors():
    # Code that skips a busy instance (InstanceInvalidState) must not skip these silently.
    assert not issubclass(E.ForeignDomain, E.InstanceInvalidState)
    for cls in (E.ServiceNotFound, E.ServiceOwned, E.OwnershipLost):
        assert issubclass(cls, E.ServiceRowError)
        assert not issubclass(cls, E.InstanceInvalidState | E.InstanceNotFound)


def test_task_stopped_is_in_the_tree_and_still_importable_from_periodic():
    assert periodic.TaskStopped is E.TaskStopped
    assert issubclass(E.TaskStopped, E.Stopping)


def test_the_four_public_types():
    assert PUBLIC_ERRORS == E.PUBLIC_ERRORS
    assert set(PUBLIC_ERRORS) == {
        E.InstanceNotFound,
        E.InvalidInput,
        E.InstanceInvalidState,
        E.HypervisorUnavailable,
    }


@pytest.mark.parametrize(
    "error,expected,message",
    [
        # input
        (E.InvalidInput("bad"), E.InvalidInput, "bad"),
        # state
        (E.InstanceNotFound("u-1", "gone"), E.InstanceNotFound, "instance u-1 not found: gone"),
        (E.InstanceInvalidState("busy"), E.InstanceInvalidState, "busy"),
        (E.InstanceExists("dup"), E.InstanceInvalidState, "dup"),
        (E.ForeignDomain("theirs"), E.InstanceInvalidState, "theirs"),
        (
            E.OwnershipLost("taken"),
            E.HypervisorUnavailable,
            "m failed on host h: OwnershipLost: taken",
        ),
        # hypervisor
        (E.HypervisorUnavailable("libvirt gone"), E.HypervisorUnavailable, "libvirt gone"),
        # database: retry, as for the hypervisor, but said as what it is
        (
            E.DatabaseUnavailable("database unavailable: connection refused"),
            E.HypervisorUnavailable,
            "database unavailable: connection refused",
        ),
        (
            E.DatabaseUnavailable("connection refused"),
            E.HypervisorUnavailable,
            "database unavailable: connection refused",
        ),
        # stopping
        (
            E.TaskStopped("task power_sync stopped"),
            E.HypervisorUnavailable,
            "host h is stopping: task power_sync stopped",
        ),
        # anything else
        (ValueError("x\ny"), E.HypervisorUnavailable, "m failed on host h: ValueError: x"),
    ],
)
def test_each_category_maps_to_one_public_type(error, expected, message):
    public = E.public_error(error, "h", "m")
    assert type(public) is expected and type(public) in PUBLIC_ERRORS
    assert str(public) == message
    assert "hypervisor unavailable: database" not in str(public)


def test_the_operator_reads_the_precise_class_and_the_cause():
    assert E.operator_error(E.DatabaseUnavailable("connection refused")) == (
        "DatabaseUnavailable",
        "database unavailable: connection refused",
    )
    assert E.operator_error(E.InstanceExists("dup")) == ("InstanceExists", "dup")
    assert E.operator_error(KeyError("k")) == ("KeyError", "'k'")


def test_unavailable_names_its_cause_once():
    assert E.HypervisorUnavailable("x").described() == "hypervisor unavailable: x"
    assert E.DatabaseUnavailable("database unavailable: x").described() == "database unavailable: x"


@pytest.fixture
def outage(conf, sqlite_db, monkeypatch):
    """A Dispatcher whose database is away: every query raises as the engine does."""

    def away(*args, **kwargs):
        raise E.DatabaseUnavailable("database unavailable: connection refused")

    monkeypatch.setattr(sqlite_db, "instance_counts", away)
    manager = ComputeManager(conf, sqlite_db, FakeDriver())
    return Dispatcher(manager, NodeService(conf, sqlite_db, components=[manager]))


def test_a_database_outage_over_rpc_is_hypervisor_unavailable_naming_the_database(outage):
    endpoint = ComputeEndpoint(outage, "test-host")
    with pytest.raises(oslo_messaging.ExpectedException) as raised:
        endpoint.call("get_host_state", {})
    sent = raised.value.exc_info[1]
    assert type(sent) is E.HypervisorUnavailable
    assert str(sent) == "database unavailable: connection refused"
    # Across the wire as oslo carries it, and as the scheduler's client raises it.
    wire = oslo_common.serialize_remote_exception(raised.value.exc_info)
    remote = oslo_common.deserialize_remote_exception(wire, [E.__name__])
    local = _local(remote)
    assert type(local) is E.HypervisorUnavailable
    assert str(local) == "database unavailable: connection refused"


def test_a_database_outage_over_the_admin_socket_names_the_database(outage):
    directory = tempfile.mkdtemp(prefix="ca-err-")
    server = AdminSocketServer(os.path.join(directory, "admin.sock"), outage, grace=0.5)
    server.start()
    try:
        with pytest.raises(RemoteError) as raised:
            AdminClient(server.path).call("get_host_state")
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)
    assert raised.value.type == "DatabaseUnavailable"
    assert raised.value.message == "database unavailable: connection refused"


def test_a_database_outage_aborts_a_power_sync_in_its_own_words(sqlite_db, monkeypatch):
    """It aborts the run as a hypervisor outage does, but never reads "hypervisor unavailable"."""
    driver = FakeDriver()
    driver.init_host("h1")
    inst = create_instance(sqlite_db, host="h1", vm_state="active", power_state="running")
    driver.add_domain(inst.domain_name, inst.uuid, PowerState.RUNNING)
    sync = PowerSync(sqlite_db, driver, "h1", KeyedLocks())

    def away(*args, **kwargs):
        raise E.DatabaseUnavailable("database unavailable: connection refused")

    monkeypatch.setattr(sync, "_sync_locked", away)
    summary = sync.run()
    assert summary.aborted == "database unavailable: connection refused"
    assert summary.errors == 0  # an outage is no error of the instance's


def test_a_value_echoed_in_an_error_is_cut_and_never_raises():
    """A client's value goes into one short line, whatever it is (hypothesis found
    `hard = [[['x' * 300, {...: -10**300}]]]` echoed whole, past the wire's limit)."""
    from compute_agent.utils import printable

    hostile = [[["x" * 300, {"k\n": -(10**300)}]]]
    assert len(printable(hostile)) <= 80 * 4  # escaped characters take up to 4 each
    assert "\n" not in printable(hostile)
    huge = 10**5000  # str() of it raises ValueError (Python's digit limit)
    assert printable(huge) == "<int too long to show>"
