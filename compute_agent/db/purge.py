"""Removing dead rows: soft-deleted instances with their audit trail, and old audit rows.

Shared by ``compute-agent-manage db purge`` and the agent's retention task.
Safe beside a running agent on the same database:

- every batch is two short transactions: one SELECT of at most ``batch``
  rows, then (after the archive has them on disk) one DELETE of exactly
  those rows by primary key, each DELETE repeating the conditions that
  chose them;
- only instances soft-deleted before the cut (fixed when the purge starts)
  and the audit rows of those instances are removed, plus, when asked,
  audit rows older than the cut of instances that still live: a live row
  is never read for deletion;
- an instance's audit rows go before the instance, and the instance only
  if it has none left: an audit row written meanwhile (the reaper writes
  them for deleted instances) keeps it for the next purge, so no audit row
  ever loses its instance;
- a purge killed at any point leaves whole rows only; the next run takes
  up what is left. Rows archived but not yet deleted when it was killed
  are archived again by the next run: the archive holds every removed row
  at least once.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import IO, Any, cast

import sqlalchemy as sa
from sqlalchemy.engine import CursorResult

from compute_agent import exception, green
from compute_agent.db.api import Database
from compute_agent.db.models import Instance, InstanceAction

# Rows per transaction: the CLI's default.
DEFAULT_BATCH = 1000
# At most this many values in one IN list (SQLite before 3.32 bound a
# statement to 999 parameters).
MAX_IN = 500

_INSTANCES = cast(sa.Table, Instance.__table__)
_ACTIONS = cast(sa.Table, InstanceAction.__table__)


@dataclass
class PurgeCounts:
    """What one purge removed (or, for a dry run, would remove)."""

    instances: int = 0  # soft-deleted instances
    instance_actions: int = 0  # the audit rows of those instances
    live_instance_actions: int = 0  # audit rows older than the cut of live instances
    left: int = 0  # dead instances kept: an audit row was written for them meanwhile
    batches: int = 0  # DELETE transactions committed

    @property
    def rows(self) -> int:
        return self.instances + self.instance_actions + self.live_instance_actions

    def add(self, other: PurgeCounts) -> None:
        for name, value in asdict(other).items():
            setattr(self, name, getattr(self, name) + value)

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class Archive:
    """An append-only JSON-lines file: one ``{"table": ..., "row": {...}}`` per line.

    Each write is flushed and fsynced before it returns, so a row is on
    disk before the DELETE that removes it is sent.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            # 0600 when created: it holds every column of the rows it keeps.
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            self._file: IO[str] = os.fdopen(fd, "a", encoding="utf-8")
        except OSError as exc:
            raise exception.InvalidInput(
                f"cannot open the archive {path}: {exc.strerror or exc}"
            ) from None

    def write(self, table: str, rows: Sequence[dict[str, Any]]) -> None:
        if not rows:
            return
        text = "".join(
            json.dumps({"table": table, "row": row}, default=_json_value, sort_keys=True) + "\n"
            for row in rows
        )
        self._file.write(text)
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


def _json_value(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return value.isoformat()
    raise TypeError(f"cannot archive a {type(value).__name__}")


class Purger:
    """Runs purges against ``db`` in batches of ``batch`` rows.

    ``host`` limits the purge to one host's instances (the agent's own);
    None is the whole database (the CLI). ``pause`` seconds are slept
    between batches (the agent's, so that its other work goes first).
    ``should_stop`` is asked before every batch: a stop leaves the rest
    for the next run. ``on_batch`` is called with the stage's name before
    each DELETE (tests inject faults there).
    """

    def __init__(
        self,
        db: Database,
        *,
        batch: int = DEFAULT_BATCH,
        archive: Archive | None = None,
        host: str | None = None,
        pause: float = 0.0,
        should_stop: Callable[[], bool] = lambda: False,
        on_batch: Callable[[str], None] | None = None,
    ) -> None:
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise exception.InvalidInput(f"batch must be a positive integer, not {batch!r}")
        self.db = db
        self.batch = batch
        self.archive = archive
        self.host = host
        self.pause = pause
        self.should_stop = should_stop
        self.on_batch = on_batch

    # -- the purges -------------------------------------------------------

    def purge_deleted(self, cut: dt.datetime) -> PurgeCounts:
        """Remove instances soft-deleted before ``cut``, their audit rows first."""
        counts = PurgeCounts()
        after = 0
        while not self.should_stop():
            dead = self.db.call(self._dead_instances, cut, after, min(self.batch, MAX_IN))
            if not dead:
                break
            after = dead[-1]["id"]
            uuids = [r["uuid"] for r in dead]
            if not self._purge_actions_of(uuids, None, counts, "instance_actions"):
                break
            self._before_delete("instances", dead)
            removed = self.db.call(self._delete_dead, [r["id"] for r in dead], cut)
            counts.instances += removed
            counts.left += len(dead) - removed
            counts.batches += 1
            self._rest()
        return counts

    def purge_actions(self, cut: dt.datetime) -> PurgeCounts:
        """Remove audit rows created before ``cut`` of instances that still live."""
        counts = PurgeCounts()
        after = 0
        while not self.should_stop():
            live = self.db.call(self._live_uuids, after, MAX_IN)
            if not live:
                break
            after = live[-1][0]
            if not self._purge_actions_of(
                [u for _, u in live], cut, counts, "live_instance_actions"
            ):
                break
        return counts

    def count(
        self, deleted_cut: dt.datetime | None, actions_cut: dt.datetime | None
    ) -> PurgeCounts:
        """What the purges with these cuts would remove now (a dry run)."""
        return cast(PurgeCounts, self.db.call(self._count, deleted_cut, actions_cut))

    # -- one batch --------------------------------------------------------

    def _purge_actions_of(
        self, uuids: list[str], cut: dt.datetime | None, counts: PurgeCounts, field: str
    ) -> bool:
        """Every audit row of ``uuids`` (created before ``cut`` if given), a batch at a time.

        False when asked to stop before the end.
        """
        while True:
            if self.should_stop():
                return False
            rows = self.db.call(self._actions_of, uuids, cut, self.batch)
            if not rows:
                return True
            self._before_delete("instance_actions", rows)
            removed = self.db.call(self._delete_actions, [r["id"] for r in rows])
            setattr(counts, field, getattr(counts, field) + removed)
            counts.batches += 1
            self._rest()

    def _before_delete(self, table: str, rows: Sequence[dict[str, Any]]) -> None:
        if self.archive is not None:
            self.archive.write(table, rows)
        if self.on_batch is not None:
            self.on_batch(table)

    def _rest(self) -> None:
        if self.pause > 0:
            green.sleep(self.pause)
        else:
            green.yield_now()

    # -- the statements (each its own transaction) ------------------------

    def _host(self, stmt: Any) -> Any:
        return stmt if self.host is None else stmt.where(_INSTANCES.c.host == self.host)

    def _dead_condition(self, cut: dt.datetime) -> Any:
        return sa.and_(_INSTANCES.c.deleted == sa.true(), _INSTANCES.c.deleted_at < cut)

    def _dead_instances(self, cut: dt.datetime, after: int, limit: int) -> list[dict[str, Any]]:
        stmt = self._host(
            sa.select(_INSTANCES)
            .where(self._dead_condition(cut), _INSTANCES.c.id > after)
            .order_by(_INSTANCES.c.id)
            .limit(limit)
        )
        with self.db.transaction() as s:
            return [dict(row._mapping) for row in s.execute(stmt)]

    def _live_uuids(self, after: int, limit: int) -> list[tuple[int, str]]:
        stmt = self._host(
            sa.select(_INSTANCES.c.id, _INSTANCES.c.uuid)
            .where(_INSTANCES.c.deleted == sa.false(), _INSTANCES.c.id > after)
            .order_by(_INSTANCES.c.id)
            .limit(limit)
        )
        with self.db.transaction() as s:
            return [(row[0], row[1]) for row in s.execute(stmt)]

    def _actions_of(
        self, uuids: list[str], cut: dt.datetime | None, limit: int
    ) -> list[dict[str, Any]]:
        stmt = sa.select(_ACTIONS).where(_ACTIONS.c.instance_uuid.in_(uuids))
        if cut is not None:
            stmt = stmt.where(_ACTIONS.c.created_at < cut)
        stmt = stmt.order_by(_ACTIONS.c.id).limit(limit)
        with self.db.transaction() as s:
            return [dict(row._mapping) for row in s.execute(stmt)]

    def _delete_actions(self, ids: list[int]) -> int:
        removed = 0
        with self.db.transaction() as s:
            for start in range(0, len(ids), MAX_IN):
                chunk = ids[start : start + MAX_IN]
                removed += _rowcount(s.execute(sa.delete(_ACTIONS).where(_ACTIONS.c.id.in_(chunk))))
        return removed

    def _delete_dead(self, ids: list[int], cut: dt.datetime) -> int:
        """The instances of ``ids`` still dead before ``cut`` and with no audit row left."""
        trail = sa.exists().where(_ACTIONS.c.instance_uuid == _INSTANCES.c.uuid)
        stmt = sa.delete(_INSTANCES).where(
            _INSTANCES.c.id.in_(ids), self._dead_condition(cut), ~trail
        )
        with self.db.transaction() as s:
            return _rowcount(s.execute(stmt))

    def _count(
        self, deleted_cut: dt.datetime | None, actions_cut: dt.datetime | None
    ) -> PurgeCounts:
        counts = PurgeCounts()
        joined = _ACTIONS.join(_INSTANCES, _ACTIONS.c.instance_uuid == _INSTANCES.c.uuid)
        with self.db.transaction() as s:
            if deleted_cut is not None:
                dead = self._dead_condition(deleted_cut)
                counts.instances = int(
                    s.scalar(self._host(sa.select(sa.func.count()).where(dead))) or 0
                )
                counts.instance_actions = int(
                    s.scalar(self._host(sa.select(sa.func.count()).select_from(joined).where(dead)))
                    or 0
                )
            if actions_cut is not None:
                stmt = (
                    sa.select(sa.func.count())
                    .select_from(joined)
                    .where(_INSTANCES.c.deleted == sa.false(), _ACTIONS.c.created_at < actions_cut)
                )
                counts.live_instance_actions = int(s.scalar(self._host(stmt)) or 0)
        return counts


def _rowcount(result: object) -> int:
    return cast("CursorResult[Any]", result).rowcount


def cut_before(days: float, now: dt.datetime) -> dt.datetime:
    """The cut ``days`` before ``now``; 0 is ``now`` itself (everything so far)."""
    return now - dt.timedelta(days=days)
