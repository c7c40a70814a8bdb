"""The schema and every query, on SQLite, PostgreSQL and MariaDB."""

import datetime as dt
import uuid

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from compute_agent import exception, servicegroup
from compute_agent.db import migration
from compute_agent.db.api import Change, Database, action_rows
from compute_agent.db.engine import normalize_url
from compute_agent.db.models import Base
from compute_agent.utils import mask_url_password, utcnow
from tests.conftest import backend_params
from tests.helpers import create_instance


def new_instance(db: Database, host: str = "h1", **over) -> object:
    return create_instance(db, host=host, **over)


def test_migrated_schema_matches_models(db):
    with db.engine.connect() as conn:
        diffs = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diffs == []


def test_schema_at_head_passes_check(db):
    assert migration.current_revision(db) == migration.head_revision()
    migration.check_schema(db)


@pytest.mark.parametrize("backend", backend_params("sqlite", "postgresql", "mysql"))
def test_unmigrated_and_newer_schema_refused(backend, db_url_factory):
    empty = Database(db_url_factory(backend))
    try:
        with pytest.raises(exception.SchemaError, match="no schema.*db sync"):
            migration.check_schema(empty)
        migration.upgrade(empty)
        migration.check_schema(empty)
        with empty.engine.begin() as conn:
            conn.execute(sa.text("UPDATE alembic_version SET version_num = '9999'"))
        with pytest.raises(exception.SchemaError, match="newer than this agent"):
            migration.check_schema(empty)
    finally:
        empty.dispose()


def test_service_start_heartbeat_stop(db):
    svc = db.service_start("h1", "compute-agent")
    assert svc.report_count == 0 and svc.stopped_at is None
    assert servicegroup.is_up(svc, down_time=60)
    db.service_heartbeat(svc.id)
    db.service_heartbeat(svc.id)
    row = db.service_get("h1", "compute-agent")
    assert row.report_count == 2
    assert abs((utcnow() - row.updated_at).total_seconds()) < 5
    db.service_stopped(svc.id)
    row = db.service_get("h1", "compute-agent")
    assert row.stopped_at is not None
    assert not servicegroup.is_up(row, down_time=60)
    # Starting again reuses the row and clears the stop.
    again = db.service_start("h1", "compute-agent")
    assert again.id == svc.id and again.stopped_at is None and again.report_count == 2


def test_service_is_down_when_heartbeat_is_old(db):
    svc = db.service_start("h1", "compute-agent")
    later = svc.updated_at + dt.timedelta(seconds=61)
    assert servicegroup.is_up(svc, 60, now=svc.updated_at + dt.timedelta(seconds=59))
    assert not servicegroup.is_up(svc, 60, now=later)
    assert servicegroup.describe(svc, 60, now=later)["up"] is False


def test_heartbeat_of_missing_row_raises(db):
    with pytest.raises(exception.ServiceNotFound):
        db.service_heartbeat(424242)


def test_auto_disable_never_overrides_manual(db):
    svc = db.service_start("h1", "compute-agent")
    assert db.service_set_disabled(
        svc.id, True, "AUTO: libvirt down", only_if_reason_prefix="AUTO:"
    )
    assert db.service_set_disabled(svc.id, False, None, only_if_reason_prefix="AUTO:")
    assert db.service_set_disabled(svc.id, True, "maintenance by ops")
    assert not db.service_set_disabled(svc.id, True, "AUTO: x", only_if_reason_prefix="AUTO:")
    assert not db.service_set_disabled(svc.id, False, None, only_if_reason_prefix="AUTO:")
    row = db.service_get("h1", "compute-agent")
    assert row.disabled and row.disabled_reason == "maintenance by ops"


def test_auto_prefix_is_literal_not_a_pattern(db):
    svc = db.service_start("h1", "compute-agent")
    db.service_set_disabled(svc.id, True, "AUTOX manual")
    # '_' is a LIKE wildcard; the prefix must be matched literally.
    assert not db.service_set_disabled(svc.id, False, None, only_if_reason_prefix="AUTO_")


def test_instance_create_and_duplicate(db):
    inst = new_instance(db)
    assert db.instance_get(inst.uuid).domain_name == inst.domain_name
    with pytest.raises(exception.InstanceExists):
        db.instance_create(
            dict(
                uuid=inst.uuid,
                host="h1",
                domain_name="x",
                vm_state="building",
                task_state=None,
                power_state="nostate",
                vcpus=1,
                memory_mb=64,
            ),
            source="rpc",
            reason="dup",
        )
    (action,) = db.actions_get(inst.uuid)
    assert (action.action, action.field, action.new_value) == ("create", "vm_state", "active")


def test_instance_get_missing_or_other_host(db):
    inst = new_instance(db, host="h1")
    with pytest.raises(exception.InstanceNotFound):
        db.instance_get(str(uuid.uuid4()))
    with pytest.raises(exception.InstanceNotFound):
        db.instance_get(inst.uuid, host="h2")


def test_get_all_by_host_is_one_statement(db):
    for _ in range(25):
        new_instance(db, host="h1")
    new_instance(db, host="h2")
    db.statements = 0
    rows = db.instance_get_all_by_host("h1")
    # The pool's check, BEGIN, the one SELECT, COMMIT: every statement counts
    # (and the transaction's statement deadline behind a transaction pooler).
    assert len(rows) == 25 and db.statements == 4 + db.transaction_pooling


def test_update_records_each_change(db):
    inst = new_instance(db)
    changes = db.instance_update(
        inst,
        {"power_state": "shutdown", "vm_state": "stopped"},
        action="sync",
        source="sync",
        reason="hypervisor says shutdown",
    )
    assert {(c.field, c.old, c.new) for c in changes} == {
        ("power_state", "running", "shutdown"),
        ("vm_state", "active", "stopped"),
    }
    assert inst.vm_state == "stopped"
    rows = db.actions_get(inst.uuid)
    assert {(r.field, r.old_value, r.new_value, r.source) for r in rows if r.action == "sync"} == {
        ("power_state", "running", "shutdown", "sync"),
        ("vm_state", "active", "stopped", "sync"),
    }


def test_update_without_change_writes_nothing(db):
    inst = new_instance(db)
    db.statements = 0
    assert db.instance_update(inst, {"power_state": "running"}, action="sync", source="sync") == []
    assert db.statements == 0


def test_conditional_update_loses_to_a_concurrent_change(db):
    inst = new_instance(db)
    stale = db.instance_get(inst.uuid)
    db.instance_update(inst, {"task_state": "powering-off"}, action="stop", source="rpc")
    with pytest.raises(exception.InstanceInvalidState):
        db.instance_update(
            stale,
            {"power_state": "shutdown"},
            action="sync",
            source="sync",
            expected={"task_state": None},
        )
    assert not db.instance_compare_and_set(stale, {"power_state": "shutdown"}, {"task_state": None})
    assert db.instance_get(inst.uuid).power_state == "running"


def test_a_batch_of_conditional_writes_reports_each_outcome(db):
    """Winners and losers mixed in one batch, two statement shapes: each outcome
    is the row's own, and only the winners' audit rows are written."""
    insts = [new_instance(db) for _ in range(6)]
    stale = [db.instance_get(i.uuid) for i in insts]
    for moved in (insts[1], insts[4]):  # changed since the batch's rows were read
        db.instance_update(moved, {"task_state": "powering-off"}, action="stop", source="rpc")
    writes = []
    for n, inst in enumerate(stale):
        values = {"power_state": "shutdown"} if n % 2 else {"power_state": "paused"}
        if n == 5:
            values["vm_state"] = "stopped"
        change = Change("power_state", "running", values["power_state"])
        audit = action_rows(inst.uuid, [change], "sync", "sync", "test", inst.updated_at)
        writes.append((inst, values, {"task_state": None, "updated_at": inst.updated_at}, audit))
    before = [len(db.actions_get(i.uuid)) for i in insts]
    assert db.instance_compare_and_set_many(writes) == [True, False, True, True, False, True]
    states = {i.uuid: db.instance_get(i.uuid) for i in insts}
    assert [states[i.uuid].power_state for i in insts] == [
        "paused",
        "running",
        "paused",
        "shutdown",
        "running",
        "shutdown",
    ]
    assert states[insts[5].uuid].vm_state == "stopped"
    after = [len(db.actions_get(i.uuid)) for i in insts]
    assert [a - b for a, b in zip(after, before, strict=True)] == [1, 0, 1, 1, 0, 1]


def test_soft_delete_hides_the_row(db):
    inst = new_instance(db)
    db.instance_soft_delete(inst, source="rpc", reason="user asked")
    with pytest.raises(exception.InstanceNotFound):
        db.instance_get(inst.uuid)
    assert db.instance_get_all_by_host("h1") == []
    assert db.actions_get(inst.uuid)[0].new_value == "deleted"


def test_long_reason_is_clipped_not_refused(db):
    inst = new_instance(db)
    db.instance_update(
        inst, {"power_state": "paused"}, action="sync", source="sync", reason="x" * 1000
    )
    assert len(db.actions_get(inst.uuid)[0].reason) == 255


def test_url_helpers():
    assert normalize_url("postgresql://u:p@h/d").drivername == "postgresql+pg8000"
    assert normalize_url("mysql://u@h/d").drivername == "mysql+pymysql"
    assert normalize_url("postgresql+psycopg://u@h/d").drivername == "postgresql+psycopg"
    assert mask_url_password("mysql+pymysql://root:s3cret@h/d") == "mysql+pymysql://root:***@h/d"
    with pytest.raises(exception.InvalidInput):
        normalize_url("not a url")


@pytest.mark.parametrize(
    "url",
    [
        "postgresql+pg8000://postgres:s3cret@127.0.0.1:1/nowhere",  # nothing listens on port 1
        "mysql+pymysql://root:s3cret@127.0.0.1:1/nowhere",
        "sqlite:////nonexistent-dir/agent.sqlite",
    ],
)
def test_an_unreachable_database_is_a_typed_error(url):
    """Both the ORM and the Core paths: every caller sees one type, no password."""
    database = Database(url)
    try:
        with pytest.raises(exception.DatabaseUnavailable) as orm:
            database.service_get("h1", "compute-agent")
        with pytest.raises(exception.DatabaseUnavailable) as core:
            database.actions_add(
                [
                    dict(
                        instance_uuid=str(uuid.uuid4()),
                        action="x",
                        source="rpc",
                        created_at=utcnow(),
                    )
                ]
            )
    finally:
        database.dispose()
    for error in (orm.value, core.value):
        assert str(error).startswith("database unavailable: ")
        assert "s3cret" not in str(error) and "\n" not in str(error)
    # What RPC callers know: the front door's mapping, no longer the class's base.
    public = exception.public_error(orm.value, "h1", "ping")
    assert type(public) is exception.HypervisorUnavailable and str(public) == str(orm.value)


def test_a_statement_error_is_not_an_outage(db):
    # SQLite and MySQL call this an OperationalError; it must stay what it is.
    with pytest.raises(sa.exc.DBAPIError) as raised, db.transaction() as s:
        s.execute(sa.text("SELECT no_such_column FROM instances"))
    assert not isinstance(raised.value, exception.DatabaseUnavailable)


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://u:pa ss@127.0.0.1:1/d",  # SQLAlchemy renders a space unquoted
        "mysql+pymysql://root:s3cret@127.0.0.1:1/d",
    ],
)
def test_safe_url_hides_any_password(url):
    """What the CLI prints (``db sync``) hides the password whatever its characters."""
    db = Database(url)
    try:
        assert "***@" in db.safe_url
        assert "pa ss" not in db.safe_url and "s3cret" not in db.safe_url
    finally:
        db.dispose()
