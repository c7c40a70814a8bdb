"""Upgrades: a database filled by the agent of every earlier schema, synced, then served.

For each revision before head and each backend: the schema at that
revision, rows written as that revision's agent wrote them (only the
columns it had: no ``owner`` before 0002), ``compute-agent-manage db sync``
as an operator runs it, then the agent's code started on it: it claims the
same service row, syncs the live instances, reaps the guest of a deleted
one, purges what retention says, and keeps every old audit row.
"""

from __future__ import annotations

import datetime as dt
import uuid as uuidlib

import pytest
import sqlalchemy as sa

from compute_agent.db import migration
from compute_agent.db.api import Database
from compute_agent.manager import POWER_SYNC, PURGE, REAPER, ComputeManager
from compute_agent.rpc import BINARY
from compute_agent.service import NodeService
from compute_agent.states import PowerState
from compute_agent.utils import utcnow
from compute_agent.virt.fake import FakeDriver
from tests.conftest import BACKENDS, PGBOUNCER
from tests.functional.agent_process import REPO, manage
from tests.helpers import wait_until

EARLIER = migration.revisions()[:-1]
HOST = "upgrade-host"


def test_every_revision_but_head_is_tested():
    assert EARLIER and migration.revisions()[-1] == migration.head_revision()


def fill(db: Database, when: dt.datetime) -> dict[str, str]:
    """What an agent of the current revision left: its service row, instances, their trail."""
    meta = sa.MetaData()
    with db.engine.begin() as conn:
        services = sa.Table("services", meta, autoload_with=conn)
        instances = sa.Table("instances", meta, autoload_with=conn)
        actions = sa.Table("instance_actions", meta, autoload_with=conn)
        service = {
            "host": HOST,
            "binary": BINARY,
            "created_at": when - dt.timedelta(days=200),
            "updated_at": when - dt.timedelta(minutes=5),
            "report_count": 12345,
            "disabled": False,
            "disabled_reason": None,
            "started_at": when - dt.timedelta(days=20),
            "stopped_at": when - dt.timedelta(minutes=5),  # stopped for the upgrade
        }
        if "owner" in services.c:
            service["owner"] = str(uuidlib.uuid4())  # the old agent's token
        conn.execute(services.insert(), [service])
        names = {}

        def instance(key: str, power: str, deleted_days: float | None) -> None:
            uid = str(uuidlib.uuid4())
            names[key] = uid
            gone = deleted_days is not None
            conn.execute(
                instances.insert(),
                [
                    {
                        "uuid": uid,
                        "host": HOST,
                        "display_name": key,
                        "domain_name": f"instance-{uid}",
                        "vm_state": "deleted" if gone else "active",
                        "task_state": None,
                        "power_state": power,
                        "vcpus": 1,
                        "memory_mb": 64,
                        "created_at": when - dt.timedelta(days=100),
                        "updated_at": when - dt.timedelta(days=deleted_days or 1),
                        "deleted_at": when - dt.timedelta(days=deleted_days) if gone else None,
                        "deleted": gone,
                    }
                ],
            )
            conn.execute(
                actions.insert(),
                [
                    {
                        "instance_uuid": uid,
                        "action": action,
                        "field": "vm_state",
                        "old_value": None,
                        "new_value": "active",
                        "reason": "written by the old agent",
                        "source": "rpc",
                        "created_at": when - dt.timedelta(days=100),
                    }
                    for action in ("create", "start")
                ],
            )

        instance("synced", "nostate", None)  # its domain runs: the sync records it
        instance("steady", "running", None)
        instance("leftover", "nostate", 3.0)  # deleted, its guest still runs: reaped
        instance("ancient", "nostate", 90.0)  # deleted long ago: retention purges it
    return names


def rows(db: Database, table: str) -> list[dict]:
    with db.engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(sa.text(f"SELECT * FROM {table}"))]


@pytest.mark.parametrize("revision", EARLIER)
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_database_of_an_earlier_agent_upgrades_and_is_served(
    backend, revision, db_url_factory, conf, tmp_path
):
    url = db_url_factory(backend)
    pooled = backend == PGBOUNCER
    old = Database(url, transaction_pooling=pooled)
    try:
        migration.upgrade(old, revision)
        assert migration.current_revision(old) == revision
        names = fill(old, utcnow())
        (before,) = rows(old, "services")
        trail = len(rows(old, "instance_actions"))
        with pytest.raises(migration.SchemaError, match="run 'compute-agent-manage db sync'"):
            migration.check_schema(old)
    finally:
        old.dispose()

    path = tmp_path / "upgrade.conf"
    path.write_text(
        f"[DEFAULT]\nstate_path = {tmp_path}/state\n[database]\nconnection = {url}\n"
        f"transaction_pooling = {str(pooled).lower()}\n"
    )
    synced = manage("db", "sync", config_files=[REPO / "etc" / "compute-agent.conf", path])
    assert synced.returncode == 0, synced.stderr
    head = migration.head_revision()
    assert f"migrated from {revision} to {head}" in synced.stdout

    db = Database(url, transaction_pooling=pooled)
    conf.set_override("host", HOST)
    conf.set_override("stats_interval", 0, group="compute")
    conf.set_override("running_deleted_instance_poll_interval", 3600, group="compute")
    conf.set_override("purge_deleted_after_days", 30, group="database")
    driver = FakeDriver()
    for key in ("synced", "steady", "leftover"):
        driver.add_domain(f"instance-{names[key]}", names[key], PowerState.RUNNING)
    manager = ComputeManager(conf, db, driver)
    service = NodeService(conf, db, components=[manager])
    try:
        migration.check_schema(db)
        service.start()
        tasks = service.runner.tasks
        assert wait_until(
            lambda: all(tasks[n].runs >= 1 for n in (POWER_SYNC, REAPER, PURGE)), timeout=30
        ), {n: tasks[n].runs for n in (POWER_SYNC, REAPER, PURGE)}
        assert [tasks[n].last_error for n in (POWER_SYNC, REAPER, PURGE)] == [None] * 3

        (after,) = rows(db, "services")
        assert after["id"] == before["id"]  # claimed the old row, made no new one
        assert after["owner"] == service.owner and after["stopped_at"] is None
        assert after["report_count"] >= before["report_count"]

        assert db.instance_get(names["synced"], host=HOST).power_state == "running"
        synced_trail = db.actions_get(names["synced"])
        assert [a.action for a in synced_trail][-2:] == ["start", "create"]  # kept, newest first
        assert any(a.action == "power_sync" for a in synced_trail)
        assert f"instance-{names['leftover']}" not in driver.domains  # reaped
        assert f"instance-{names['steady']}" in driver.domains
        left = {r["uuid"] for r in rows(db, "instances")}
        assert left == {names[k] for k in ("synced", "steady", "leftover")}  # ancient purged
        assert len(rows(db, "instance_actions")) >= trail - 2
    finally:
        service.stop()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_database_newer_than_the_agent_is_refused_in_one_line(backend, db_url_factory):
    db = Database(db_url_factory(backend), transaction_pooling=backend == PGBOUNCER)
    try:
        migration.upgrade(db)
        with db.engine.begin() as conn:
            conn.execute(sa.text("UPDATE alembic_version SET version_num = '9999'"))
        with pytest.raises(migration.SchemaError) as info:
            migration.check_schema(db)
        text = str(info.value)
        assert "newer than this agent knows" in text and "upgrade the agent" in text
        assert "\n" not in text
    finally:
        db.dispose()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_sync_to_0003_killed_after_its_first_index_is_finished_by_the_next(
    backend, db_url_factory
):
    """MariaDB commits each CREATE INDEX by itself: the first may be there already."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from compute_agent.db.models import Base

    db = Database(db_url_factory(backend), transaction_pooling=backend == PGBOUNCER)
    try:
        migration.upgrade(db, "0002")
        with db.engine.begin() as conn:
            conn.execute(sa.text("CREATE INDEX ix_instances_deleted_at ON instances (deleted_at)"))
        assert migration.upgrade(db) == migration.head_revision()
        with db.engine.connect() as conn:
            assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
    finally:
        db.dispose()
