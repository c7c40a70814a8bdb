"""Retention: the agent's own purge of its host's dead rows, as a periodic task."""

from __future__ import annotations

import datetime as dt

import pytest
import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families

from compute_agent import exception, green
from compute_agent.db.models import Instance, InstanceAction
from compute_agent.dispatch import Dispatcher
from compute_agent.manager import PURGE, ComputeManager
from compute_agent.metrics.collector import AgentCollector
from compute_agent.metrics.server import MetricsServer
from compute_agent.retention import INTERVAL, Retention
from compute_agent.service import NodeService
from compute_agent.states import ActionSource
from compute_agent.utils import utcnow
from compute_agent.virt.fake import FakeDriver
from tests.helpers import create_instance, dead_instance, wait_until


def age_actions(db, uuid: str, days: float) -> None:
    with db.engine.begin() as conn:
        conn.execute(
            sa.update(InstanceAction)
            .where(InstanceAction.instance_uuid == uuid)
            .values(created_at=utcnow() - dt.timedelta(days=days))
        )


def uuids(db) -> set[str]:
    with db.engine.connect() as conn:
        return set(conn.scalars(sa.select(Instance.uuid)))


def action_uuids(db) -> list[str]:
    with db.engine.connect() as conn:
        return list(conn.scalars(sa.select(InstanceAction.instance_uuid)))


def test_a_run_purges_this_hosts_old_rows_as_configured(db):
    live, aged = create_instance(db, host="h1"), create_instance(db, host="h1")
    age_actions(db, aged.uuid, 100)
    old, recent, elsewhere = (
        dead_instance(db, "h1", 40),
        dead_instance(db, "h1", 5),
        dead_instance(db, "h2", 40),
    )
    retention = Retention(
        db, "h1", deleted_after_days=30, actions_after_days=90, batch=2, pause=0.001
    )
    assert retention.enabled and retention.interval == INTERVAL
    summary = retention.run()
    assert summary.aborted is None
    assert (summary.instances, summary.instance_actions, summary.live_instance_actions) == (1, 3, 1)
    assert uuids(db) == {live.uuid, aged.uuid, recent.uuid, elsewhere.uuid} != {old.uuid}
    assert aged.uuid not in action_uuids(db) and live.uuid in action_uuids(db)
    stats = retention.statistics()
    assert stats.runs == 1 and stats.totals["instances"] == 1 and stats.last_run_at
    assert stats.last_run is not None and stats.last_run["batches"] >= 2
    assert retention.run().instances == 0 and retention.statistics().totals["instances"] == 1


def test_zero_days_purges_nothing_and_schedules_nothing(db):
    dead_instance(db, "h1", 400)
    retention = Retention(db, "h1")
    assert not retention.enabled and retention.interval == 0
    assert retention.run().instances == 0 and len(uuids(db)) == 1


def test_the_hub_runs_other_work_between_two_batches(db):
    """The cause of a short hub stretch: a pause after every batch, other greenthreads run."""
    for _ in range(6):
        dead_instance(db, "h1", 40)
    ticks = 0
    stop = False

    def ticker() -> None:
        nonlocal ticks
        while not stop:
            ticks += 1
            green.sleep(0.005)

    seen: list[int] = []
    retention = Retention(db, "h1", deleted_after_days=1, batch=2, pause=0.05)
    thread = green.spawn(ticker, name="ticker")
    try:
        # Record the ticker's count before each batch's DELETE.
        from compute_agent.db import purge

        original = purge.Purger._before_delete

        def spy(self, table, rows):
            seen.append(ticks)
            original(self, table, rows)

        purge.Purger._before_delete = spy  # type: ignore[method-assign]
        try:
            summary = retention.run()
        finally:
            purge.Purger._before_delete = original  # type: ignore[method-assign]
    finally:
        stop = True
        thread.result(5)
    assert summary.instances == 6 and len(seen) >= 6
    assert all(b > a for a, b in zip(seen, seen[1:], strict=False)), seen


def test_a_database_outage_ends_the_run_in_one_line(db, monkeypatch):
    dead_instance(db, "h1", 40)
    retention = Retention(db, "h1", deleted_after_days=1)

    def down(*_args, **_kwargs):
        raise exception.DatabaseUnavailable("database unavailable: test")

    monkeypatch.setattr(db, "call", down)
    summary = retention.run()
    assert summary.aborted and "database unavailable" in summary.aborted
    assert retention.statistics().runs == 1


def test_bad_days_are_typed_errors(db):
    with pytest.raises(exception.InvalidInput, match="purge_deleted_after_days"):
        Retention(db, "h1", deleted_after_days=-1)
    with pytest.raises(exception.InvalidInput, match="purge_actions_after_days"):
        Retention(db, "h1", actions_after_days=True)


@pytest.fixture
def agent(conf, sqlite_db):
    conf.set_override("stats_interval", 0, group="compute")
    conf.set_override("purge_deleted_after_days", 7, group="database")
    manager = ComputeManager(conf, sqlite_db, FakeDriver())
    service = NodeService(conf, sqlite_db, components=[manager])
    yield service, manager
    service.stop()


def test_the_agent_purges_in_its_own_task_and_shows_it(agent, sqlite_db, conf):
    service, manager = agent
    live = create_instance(sqlite_db, host=conf.host)
    gone = [dead_instance(sqlite_db, conf.host, 10) for _ in range(3)]
    kept = dead_instance(sqlite_db, conf.host, 1)
    service.start()
    task = service.runner.tasks[PURGE]
    assert task.enabled and task.interval == INTERVAL
    assert wait_until(lambda: task.runs >= 1, timeout=20)  # the first run comes at start
    assert task.last_error is None
    assert uuids(sqlite_db) == {live.uuid, kept.uuid}
    assert not {i.uuid for i in gone} & set(action_uuids(sqlite_db))
    status = Dispatcher(manager, service).call("status", {}, ActionSource.CLI, admin=True)
    assert status["db_purge"]["deleted_after_days"] == 7
    assert status["db_purge"]["totals"]["instances"] == 3
    text = MetricsServer("127.0.0.1", 0, AgentCollector(service, manager)).render().decode()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    key = (
        "compute_agent_db_purged_rows_total",
        (("table", "instances"), ("which", "deleted")),
    )
    assert samples[key] == 3
    assert samples[("compute_agent_db_purge_runs_total", ())] >= 1


def test_off_by_default_yet_registered(conf, sqlite_db):
    manager = ComputeManager(conf, sqlite_db, FakeDriver())
    service = NodeService(conf, sqlite_db, components=[manager])
    try:
        dead_instance(sqlite_db, conf.host, 1000)
        service.start()
        task = service.runner.tasks[PURGE]
        assert not task.enabled
        green.sleep(0.2)
        assert task.runs == 0 and len(uuids(sqlite_db)) == 1
    finally:
        service.stop()
