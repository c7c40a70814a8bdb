"""The purge on every backend: what it removes, what it never touches, and how it stops."""

from __future__ import annotations

import datetime as dt
import json
import uuid as uuidlib

import pytest
import sqlalchemy as sa

from compute_agent import exception
from compute_agent.db import purge
from compute_agent.db.models import Instance, InstanceAction
from compute_agent.utils import utcnow
from tests.helpers import create_instance

DAY = dt.timedelta(days=1)


class Injected(Exception):
    """A purge killed half-way."""


def dead(db, days_ago: float, host: str = "h1", extra_actions: int = 2):
    """A soft-deleted instance, deleted ``days_ago``, with a few more audit rows."""
    inst = create_instance(db, host=host)
    db.actions_add(
        {
            "instance_uuid": inst.uuid,
            "action": "stop",
            "field": "power_state",
            "old_value": "running",
            "new_value": "shutdown",
            "reason": "test",
            "source": "rpc",
            "created_at": utcnow(),
        }
        for _ in range(extra_actions)
    )
    db.instance_soft_delete(inst, "rpc", "test")
    when = utcnow() - dt.timedelta(days=days_ago)
    with db.engine.begin() as conn:
        conn.execute(sa.update(Instance).where(Instance.id == inst.id).values(deleted_at=when))
    return inst


def age_actions(db, uuid: str, days: float) -> None:
    when = utcnow() - dt.timedelta(days=days)
    with db.engine.begin() as conn:
        conn.execute(
            sa.update(InstanceAction)
            .where(InstanceAction.instance_uuid == uuid)
            .values(created_at=when)
        )


def snapshot(db) -> tuple[dict[str, tuple], dict[int, tuple]]:
    """Every instance row by uuid and every audit row by id, as plain tuples."""
    with db.engine.connect() as conn:
        insts = {r.uuid: tuple(r) for r in conn.execute(sa.select(Instance.__table__))}
        acts = {r.id: tuple(r) for r in conn.execute(sa.select(InstanceAction.__table__))}
    return insts, acts


def orphans(db) -> int:
    """Audit rows whose instance row is gone: a purge must never leave one."""
    table, inst = InstanceAction.__table__, Instance.__table__
    stmt = sa.select(sa.func.count()).where(
        ~sa.exists().where(inst.c.uuid == table.c.instance_uuid)
    )
    with db.engine.connect() as conn:
        return int(conn.scalar(stmt.select_from(table)) or 0)


def test_removes_only_instances_deleted_before_the_cut_with_their_trail(db, tmp_path):
    live = create_instance(db)
    old = [dead(db, 10) for _ in range(3)]
    recent = dead(db, 1)
    insts, acts = snapshot(db)
    archive = purge.Archive(str(tmp_path / "archive.jsonl"))
    counts = purge.Purger(db, batch=2, archive=archive).purge_deleted(utcnow() - 5 * DAY)
    archive.close()

    after_insts, after_acts = snapshot(db)
    gone = {i.uuid for i in old}
    assert set(after_insts) == {live.uuid, recent.uuid}
    assert after_insts[live.uuid] == insts[live.uuid]  # untouched, field for field
    kept = {k: v for k, v in acts.items() if v[1] not in gone}
    assert after_acts == kept  # the live and the recent trails whole
    assert counts.instances == 3 and counts.left == 0
    assert counts.instance_actions == len(acts) - len(kept) > 3
    assert orphans(db) == 0
    lines = [json.loads(line) for line in (tmp_path / "archive.jsonl").read_text().splitlines()]
    archived = {(x["table"], x["row"].get("uuid") or x["row"]["id"]) for x in lines}
    assert archived == {("instances", u) for u in gone} | {
        ("instance_actions", i) for i, v in acts.items() if v[1] in gone
    }
    assert (tmp_path / "archive.jsonl").stat().st_mode & 0o777 == 0o600
    row = next(x["row"] for x in lines if x["table"] == "instances")
    assert row["deleted"] is True and dt.datetime.fromisoformat(row["deleted_at"])


def test_every_batch_is_on_disk_before_its_delete(db, tmp_path):
    for _ in range(4):
        dead(db, 3)
    path = tmp_path / "archive.jsonl"
    archive = purge.Archive(str(path))
    seen: list[tuple[str, int, int]] = []

    def check(table: str) -> None:
        # Everything archived so far is still in the database or gone by an
        # earlier batch: this batch's rows are on disk and not yet deleted.
        on_disk = [json.loads(line) for line in path.read_text().splitlines()]
        ids = {x["row"]["id"] for x in on_disk if x["table"] == table}
        insts, acts = snapshot(db)
        present = {v[0] for v in insts.values()} if table == "instances" else set(acts)
        seen.append((table, len(ids), len(ids & present)))

    purge.Purger(db, batch=3, archive=archive, on_batch=check).purge_deleted(utcnow())
    archive.close()
    assert {t for t, _, _ in seen} == {"instances", "instance_actions"}
    # Each time: the rows just archived (at most a batch) are all still there.
    assert all(0 < present <= 3 for _, _, present in seen), seen


def test_a_purge_killed_half_way_leaves_whole_rows_and_the_next_one_finishes(db, tmp_path):
    live = create_instance(db)
    old = [dead(db, 2, extra_actions=3) for _ in range(5)]
    insts, acts = snapshot(db)
    path = tmp_path / "archive.jsonl"
    calls = 0

    def fault(_table: str) -> None:
        nonlocal calls
        calls += 1
        if calls == 4:
            raise Injected

    archive = purge.Archive(str(path))
    with pytest.raises(Injected):
        purge.Purger(db, batch=2, archive=archive, on_batch=fault).purge_deleted(utcnow())
    archive.close()
    mid_insts, mid_acts = snapshot(db)
    assert 0 < len(insts) - len(mid_insts) or 0 < len(acts) - len(mid_acts)
    assert orphans(db) == 0
    assert mid_insts[live.uuid] == insts[live.uuid]
    assert {k for k, v in acts.items() if v[1] == live.uuid} <= set(mid_acts)

    archive = purge.Archive(str(path))
    purge.Purger(db, batch=2, archive=archive).purge_deleted(utcnow())
    archive.close()
    end_insts, end_acts = snapshot(db)
    assert set(end_insts) == {live.uuid}
    assert end_acts == {k: v for k, v in acts.items() if v[1] == live.uuid}
    # Every removed row is in the archive (some twice: archived, then killed).
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert {x["row"]["uuid"] for x in lines if x["table"] == "instances"} == {i.uuid for i in old}
    assert {x["row"]["id"] for x in lines if x["table"] == "instance_actions"} == {
        k for k, v in acts.items() if v[1] != live.uuid
    }


def test_an_instance_deleted_while_the_purge_runs_is_left_for_the_next(db):
    for _ in range(3):
        dead(db, 1)
    victim = create_instance(db)
    deleted = []

    def delete_meanwhile(_table: str) -> None:
        if not deleted:
            db.instance_soft_delete(victim, "rpc", "deleted during the purge")
            deleted.append(victim.uuid)

    cut = utcnow()
    counts = purge.Purger(db, batch=1, on_batch=delete_meanwhile).purge_deleted(cut)
    assert counts.instances == 3
    insts, acts = snapshot(db)
    assert set(insts) == {victim.uuid} and insts[victim.uuid][-1] is True  # deleted, kept
    assert {v[1] for v in acts.values()} == {victim.uuid}  # its trail whole
    assert purge.Purger(db).purge_deleted(utcnow()).instances == 1
    assert snapshot(db) == ({}, {})


def test_an_audit_row_written_meanwhile_keeps_its_instance_for_the_next_purge(db):
    inst = dead(db, 3)

    def reaper_writes(table: str) -> None:
        if table == "instances":
            db.actions_add(
                [
                    {
                        "instance_uuid": inst.uuid,
                        "action": "running_deleted",
                        "field": "domain",
                        "old_value": None,
                        "new_value": "reaped",
                        "reason": "test",
                        "source": "reaper",
                        "created_at": utcnow(),
                    }
                ]
            )

    counts = purge.Purger(db, on_batch=reaper_writes).purge_deleted(utcnow())
    assert (counts.instances, counts.left) == (0, 1)
    insts, acts = snapshot(db)
    assert set(insts) == {inst.uuid} and len(acts) == 1 and orphans(db) == 0
    assert purge.Purger(db).purge_deleted(utcnow()).instances == 1
    assert snapshot(db) == ({}, {})


def test_old_audit_rows_of_live_instances_only_with_actions(db):
    a, b = create_instance(db), create_instance(db)
    gone = dead(db, 1)
    age_actions(db, a.uuid, 40)
    age_actions(db, gone.uuid, 40)
    db.instance_update(b, {"power_state": "shutdown"}, action="stop", source="rpc")
    age_actions(db, b.uuid, 40)
    db.instance_update(b, {"power_state": "running"}, action="start", source="rpc")  # new
    _, acts = snapshot(db)
    purger = purge.Purger(db, batch=1)
    cut = utcnow() - 30 * DAY
    assert purger.count(None, cut).live_instance_actions == 3
    counts = purger.purge_actions(cut)
    assert counts.live_instance_actions == 3 and counts.instances == 0
    insts, after = snapshot(db)
    assert set(insts) == {a.uuid, b.uuid, gone.uuid}
    # Left: b's new row and the deleted instance's (the dead purge's business).
    assert {v[2] for v in after.values() if v[1] == b.uuid} == {"start"}
    assert {k for k, v in acts.items() if v[1] == gone.uuid} <= set(after)
    assert not any(v[1] == a.uuid for v in after.values())


def test_dry_run_counts_what_a_purge_removes(db):
    create_instance(db)
    for _ in range(3):
        dead(db, 8)
    dead(db, 2)
    cut = utcnow() - 5 * DAY
    purger = purge.Purger(db)
    planned = purger.count(cut, None)
    before = snapshot(db)
    assert snapshot(db) == before
    done = purger.purge_deleted(cut)
    assert (planned.instances, planned.instance_actions) == (done.instances, done.instance_actions)
    assert planned.instances == 3


def test_a_host_purges_its_own_dead_rows_only(db):
    mine, theirs = dead(db, 3, host="h1"), dead(db, 3, host="h2")
    counts = purge.Purger(db, host="h1").purge_deleted(utcnow())
    assert counts.instances == 1
    assert set(snapshot(db)[0]) == {theirs.uuid} != {mine.uuid}


def test_a_stop_leaves_the_rest_for_the_next_run(db):
    for _ in range(4):
        dead(db, 3)
    stops = iter([False, False, False, True])
    counts = purge.Purger(db, batch=1, should_stop=lambda: next(stops, True)).purge_deleted(
        utcnow()
    )
    assert counts.rows < 4 * 4 and orphans(db) == 0
    purge.Purger(db).purge_deleted(utcnow())
    assert snapshot(db) == ({}, {})


def test_bad_batch_and_archive_are_typed_errors(db, tmp_path):
    with pytest.raises(exception.InvalidInput, match="batch"):
        purge.Purger(db, batch=0)
    with pytest.raises(exception.InvalidInput, match="cannot open the archive"):
        purge.Archive(str(tmp_path / "missing" / "a.jsonl"))


def test_a_uuid_that_is_no_instance_is_never_purged(db):
    """Audit rows with no instance row (written by hand, or by nova) are left alone."""
    uid = str(uuidlib.uuid4())
    db.actions_add(
        [
            {
                "instance_uuid": uid,
                "action": "x",
                "field": None,
                "old_value": None,
                "new_value": None,
                "reason": None,
                "source": "rpc",
                "created_at": utcnow() - 90 * DAY,
            }
        ]
    )
    purger = purge.Purger(db)
    assert purger.purge_deleted(utcnow()).rows == 0
    assert purger.purge_actions(utcnow()).rows == 0
    assert len(snapshot(db)[1]) == 1
