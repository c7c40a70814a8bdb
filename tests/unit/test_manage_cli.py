"""The CLI in-process: output formats, and power-sync's and reap-deleted's exit statuses."""

import argparse
import io
import json
import os
import shutil
import socket
import tempfile
import time
import types
import uuid

import pytest

from compute_agent import exception, green
from compute_agent.admin import client as client_module
from compute_agent.admin.client import AdminClient
from compute_agent.admin.server import AdminSocketServer
from compute_agent.cmd import manage, output
from compute_agent.cmd.common import EXIT_FAILED, EXIT_OK
from compute_agent.dispatch import Dispatcher
from compute_agent.exception import AgentUnreachable, Fatal
from compute_agent.manager import ComputeManager
from compute_agent.service import NodeService
from compute_agent.states import PowerState
from compute_agent.virt.fake import FakeDriver
from tests.helpers import create_instance

ROWS = [
    {"uuid": "u1", "name": "web", "power_state": "running", "task_state": None},
    {"uuid": "u2", "name": "database 2", "power_state": "shutdown", "task_state": "rebooting"},
]
COLUMNS = ("uuid", "name", "power_state", "task_state")


def render(fn, *args):
    out = io.StringIO()
    fn(out, *args)
    return out.getvalue()


def test_table_is_aligned_and_boxed():
    text = render(output.emit_list, "table", ROWS, COLUMNS)
    assert text.splitlines() == [
        "+------+------------+-------------+------------+",
        "| uuid | name       | power_state | task_state |",
        "+------+------------+-------------+------------+",
        "| u1   | web        | running     | None       |",
        "| u2   | database 2 | shutdown    | rebooting  |",
        "+------+------------+-------------+------------+",
    ]


def test_an_empty_list_is_a_header_only():
    assert render(output.emit_list, "table", [], ("uuid",)).count("| uuid |") == 1
    assert render(output.emit_list, "value", [], ("uuid",)) == ""
    assert json.loads(render(output.emit_list, "json", [], ("uuid",))) == []


def test_value_and_json_of_a_list_with_columns():
    assert render(output.emit_list, "value", ROWS, COLUMNS, ["power_state", "uuid"]) == (
        "running u1\nshutdown u2\n"
    )
    assert json.loads(render(output.emit_list, "json", ROWS, COLUMNS, ["name"])) == [
        {"name": "web"},
        {"name": "database 2"},
    ]
    with pytest.raises(exception.ColumnError, match="unknown column 'colour'"):
        render(output.emit_list, "table", ROWS, COLUMNS, ["colour"])


def test_one_record_is_flattened_for_people_and_nested_for_programs():
    record = {"uuid": "u1", "stats": {"cpu_time_ns": 5, "state": "running"}, "tags": ["a", "b"]}
    table = render(output.emit_one, "table", record)
    assert "| stats.cpu_time_ns | 5 " in table and "| tags              | a, b " in table
    assert render(output.emit_one, "value", record) == "u1\n5\nrunning\na, b\n"
    assert json.loads(render(output.emit_one, "json", record)) == record
    assert json.loads(render(output.emit_one, "json", record, ["stats.state"])) == {
        "stats.state": "running"
    }


def test_cells_are_one_line():
    assert output.cell("line one\nline two") == "line one line two"
    assert output.cell({"a": 1, "b": None}) == "a=1, b=None"


# -- power-sync against an in-process agent ---------------------------------


@pytest.fixture
def agent(conf, sqlite_db):
    conf.set_override("stats_interval", 0, group="compute")
    driver = FakeDriver()
    manager = ComputeManager(conf, sqlite_db, driver)
    service = NodeService(conf, sqlite_db, components=[manager])
    directory = tempfile.mkdtemp(prefix="ca-cli-")
    server = AdminSocketServer(os.path.join(directory, "admin.sock"), Dispatcher(manager, service))
    service.components.append(server)
    service.start()
    while service.runner.tasks["power_sync"].runs == 0:
        green.sleep(0.01)
    yield server, driver
    service.stop()
    # The option groups are module objects shared by every ConfigOpts: undo.
    conf.clear_override("stats_interval", group="compute")
    shutil.rmtree(directory, ignore_errors=True)


def cli_conf(server, **args):
    category = {"sync_instance": None, "reply_timeout": None, "out_format": "json"}
    category.update({"out_columns": None, **args})
    return types.SimpleNamespace(
        admin_socket=server.path, category=types.SimpleNamespace(**category)
    )


def test_power_sync_with_per_instance_errors_exits_0_and_warns(agent, sqlite_db, capsys):
    server, driver = agent
    uid = str(uuid.uuid4())
    create_instance(sqlite_db, host="test-host", uuid=uid, name="vm1")
    driver.add_domain("vm1", uid, PowerState.RUNNING)
    driver.inject_fault("get_info")
    assert manage.cmd_power_sync(cli_conf(server)) == EXIT_OK
    out, err = capsys.readouterr()
    assert json.loads(out)["errors"] == 1
    assert err == (
        "compute-agent-manage: warning: 1 instance(s) could not be synced; "
        "the agent's log says why\n"
    )


def test_power_sync_aborted_exits_1_after_showing_the_summary(agent, capsys):
    server, driver = agent
    driver.inject_fault("list_domains", error=exception.HypervisorUnavailable("libvirt gone"))
    with pytest.raises(Fatal) as failed:
        manage.cmd_power_sync(cli_conf(server, out_format="value", out_columns=["aborted"]))
    assert failed.value.status == EXIT_FAILED
    assert str(failed.value) == "power sync aborted: hypervisor unavailable: libvirt gone"
    assert capsys.readouterr().out == "hypervisor unavailable: libvirt gone\n"


# -- reap-deleted against an in-process agent -------------------------------


def test_reap_deleted_reaps_shows_the_summary_and_status_counts_it(agent, sqlite_db, capsys):
    server, driver = agent
    inst = create_instance(sqlite_db, host="test-host")
    sqlite_db.instance_soft_delete(inst, source="rpc", reason="test")
    driver.add_domain(inst.domain_name, inst.uuid, PowerState.RUNNING)
    driver.add_domain("not-ours", str(uuid.uuid4()), PowerState.RUNNING)
    assert manage.cmd_reap_deleted(cli_conf(server)) == EXIT_OK
    out, err = capsys.readouterr()
    summary = json.loads(out)
    assert (summary["action"], summary["found"], summary["reaped"]) == ("reap", 1, 1)
    assert summary["domains"] == [inst.domain_name] and err == ""
    assert set(driver.domains) == {"not-ours"}
    assert manage.cmd_status(cli_conf(server, out_format="table")) == EXIT_OK
    table = capsys.readouterr().out
    assert "running_deleted.totals.reaped" in table and "running_deleted.action" in table


def test_reap_deleted_aborted_exits_1_and_errors_warn(agent, sqlite_db, capsys):
    server, driver = agent
    inst = create_instance(sqlite_db, host="test-host")
    sqlite_db.instance_soft_delete(inst, source="rpc", reason="test")
    driver.add_domain(inst.domain_name, inst.uuid, PowerState.RUNNING)
    driver.inject_fault("destroy")
    assert manage.cmd_reap_deleted(cli_conf(server)) == EXIT_OK
    out, err = capsys.readouterr()
    assert json.loads(out)["errors"] == 1
    assert err == (
        "compute-agent-manage: warning: 1 domain(s) could not be handled; "
        "the agent's log says why\n"
    )
    driver.inject_fault("list_domains", error=exception.HypervisorUnavailable("libvirt gone"))
    with pytest.raises(Fatal) as failed:
        manage.cmd_reap_deleted(cli_conf(server))
    assert failed.value.status == EXIT_FAILED
    assert str(failed.value) == "reap-deleted aborted: hypervisor unavailable: libvirt gone"


# -- deadlines ---------------------------------------------------------------


def timeout_conf(given=None, shutdown=60):
    return types.SimpleNamespace(
        category=types.SimpleNamespace(reply_timeout=given),
        compute=types.SimpleNamespace(shutdown_timeout=shutdown),
    )


def test_every_call_has_a_deadline_and_operations_a_longer_one():
    conf = timeout_conf()
    assert manage._timeout(conf, "status", {}) == 30.0
    assert manage._timeout(conf, "sync_power_states", {}) == 30.0  # between progress lines
    assert manage._timeout(conf, "stop_instance", {"instance_uuid": "u"}) == 30 + 60 + 30
    assert manage._timeout(conf, "sync_power_states", {"instance_uuid": "u"}) == 120
    assert manage._timeout(timeout_conf(shutdown=0), "build_instance", {}) == 60
    assert manage._timeout(timeout_conf(given=2.5), "stop_instance", {}) == 2.5


def test_a_silent_agent_times_out_as_unreachable():
    """AgentTimeout is an AgentUnreachable: run() makes it exit 3 (test_cli_deadlines)."""
    directory = tempfile.mkdtemp(prefix="ca-cli-")
    path = os.path.join(directory, "admin.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)  # accepts into the backlog, never answers: a stopped agent
    conf = types.SimpleNamespace(
        admin_socket=path,
        category=types.SimpleNamespace(reply_timeout=0.5, out_format="json"),
    )
    try:
        started = time.monotonic()
        with pytest.raises(AgentUnreachable, match=f"no answer from the agent on {path} after 0."):
            manage.cmd_status(conf)
        assert time.monotonic() - started < 0.5 + 5
    finally:
        listener.close()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.parametrize("value", ["inf", "1e400", "1e10", "21601"])
def test_a_timeout_no_socket_can_take_is_a_usage_error(value):
    """``--timeout 1e10`` crashed the CLI with an OverflowError (exit 1), ``inf`` was taken."""
    with pytest.raises(argparse.ArgumentTypeError, match=f"must be at most 21600, not {value}"):
        manage._seconds(value)
    assert manage._seconds("21600") == 21600.0


def test_a_deadline_spent_before_the_send_is_a_timeout_not_a_crash():
    """``--timeout 0.000001`` crashed the CLI with ValueError from settimeout (exit 1)."""
    directory = tempfile.mkdtemp(prefix="ca-cli-")
    path = os.path.join(directory, "admin.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    try:
        for timeout in (1e-6, 1e-9):
            with pytest.raises(AgentUnreachable):
                AdminClient(path, timeout=timeout).call("status")
        # A far deadline (a library caller's) is armed as the longest a call may have.
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            client_module._arm(sock, 1e10)
            assert sock.gettimeout() == client_module.MAX_TOTAL
    finally:
        listener.close()
        shutil.rmtree(directory)
