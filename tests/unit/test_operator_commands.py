# ruff: noqa: F811 - the fixture agent comes from test_admin_socket
"""The operator's requests in-process: the audit trail and the service's enable/disable."""

import contextlib
import uuid

import pytest

from compute_agent import exception, green
from compute_agent.manager import AUTO_PREFIX
from compute_agent.service import BINARY
from compute_agent.states import ActionSource
from tests.helpers import create_instance
from tests.unit.test_admin_socket import agent  # noqa: F401 - fixture

CLI = ActionSource.CLI


def call(dispatcher, method, **args):
    return dispatcher.call(method, args, CLI, admin=True)


def test_the_audit_trail_oldest_first_and_limited(agent, sqlite_db):
    uid = str(uuid.uuid4())
    create_instance(sqlite_db, host="test-host", uuid=uid, name="trail")
    agent.manager.driver.add_domain("trail", uid)
    call(agent, "stop_instance", instance_uuid=uid)
    call(agent, "start_instance", instance_uuid=uid)
    rows = call(agent, "get_instance_actions", instance_uuid=uid)
    assert len(rows) >= 3
    ids = [r["id"] for r in rows]
    assert ids == sorted(ids)  # oldest first
    assert {"cli", "rpc"} <= {r["source"] for r in rows}
    assert all(r["created_at"].endswith("Z") for r in rows)
    assert call(agent, "get_instance_actions", instance_uuid=uid, limit=1) == rows[-1:]


def test_the_audit_trail_of_a_stranger_and_bad_limits(agent):
    with pytest.raises(exception.InstanceNotFound):
        call(agent, "get_instance_actions", instance_uuid=str(uuid.uuid4()))
    for limit in (0, 1001, "5", True):
        with pytest.raises(exception.InvalidInput, match="limit must be an integer"):
            call(agent, "get_instance_actions", instance_uuid=str(uuid.uuid4()), limit=limit)
    with pytest.raises(exception.InvalidInput, match="unknown method"):
        agent.call("get_instance_actions", {"instance_uuid": "x"}, ActionSource.RPC)


def row(sqlite_db):
    return sqlite_db.service_get("test-host", BINARY)


def test_disable_and_enable_with_a_reason(agent, sqlite_db):
    shown = call(agent, "set_service_disabled", disabled=True, reason="RAM swap, ticket 42")
    assert shown["disabled"] is True and shown["disabled_reason"] == "RAM swap, ticket 42"
    assert row(sqlite_db).disabled
    shown = call(agent, "set_service_disabled", disabled=False)
    assert shown["disabled"] is False and shown["disabled_reason"] is None


@pytest.mark.parametrize(
    ("args", "says"),
    [
        ({"disabled": "yes"}, "true or false"),
        ({"disabled": True, "reason": f"{AUTO_PREFIX} mine"}, "may not start with"),
        ({"disabled": True, "reason": "auto: disk swap"}, "may not start with"),
        ({"disabled": True, "reason": "Auto:x"}, "may not start with"),
        ({"disabled": True, "reason": "a\nb"}, "printable"),
        ({"disabled": True, "reason": "x" * 256}, "1 to 255"),
        ({"disabled": False, "reason": "why"}, "only to disable"),
    ],
)
def test_bad_enable_disable_requests_are_invalid_input(agent, args, says):
    with pytest.raises(exception.InvalidInput, match=says):
        call(agent, "set_service_disabled", **args)


def test_the_operators_disable_outlives_the_hypervisors_return(agent, sqlite_db):
    driver = agent.manager.driver
    driver.disconnect("cable pulled")
    agent.manager._on_connection(False, "cable pulled")
    assert row(sqlite_db).disabled_reason.startswith(AUTO_PREFIX)
    # The operator's disable replaces the automatic one ...
    call(agent, "set_service_disabled", disabled=True, reason="maintenance")
    driver.reconnect()
    agent.manager._on_connection(True, "back")
    # ... so the automatic enable leaves it alone.
    assert row(sqlite_db).disabled and row(sqlite_db).disabled_reason == "maintenance"
    green.sleep(0)


@pytest.mark.parametrize("reason", ["auto: disk swap", "Auto:ticket 7"])
def test_an_operator_reason_like_the_agents_own_is_refused_not_lifted(agent, sqlite_db, reason):
    """``disable --reason 'auto: disk swap'`` was lifted by libvirt's return (LIKE has no case)."""
    call(agent, "set_service_disabled", disabled=True, reason="maintenance")
    driver = agent.manager.driver
    driver.disconnect("cable pulled")
    agent.manager._on_connection(False, "cable pulled")
    with contextlib.suppress(exception.InvalidInput):  # refused now
        call(agent, "set_service_disabled", disabled=True, reason=reason)
    driver.reconnect()
    agent.manager._on_connection(True, "back")
    assert row(sqlite_db).disabled  # whichever disable stands, the agent never lifts it
    green.sleep(0)


def test_an_enable_while_the_hypervisor_is_away_waits_for_it(agent, sqlite_db):
    driver = agent.manager.driver
    call(agent, "set_service_disabled", disabled=True, reason="maintenance")
    driver.disconnect("cable pulled")
    shown = call(agent, "set_service_disabled", disabled=False)
    assert shown["disabled"] is True and shown["disabled_reason"].startswith(AUTO_PREFIX)
    driver.reconnect()
    agent.manager._on_connection(True, "back")
    assert not row(sqlite_db).disabled
