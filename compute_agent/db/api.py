"""Data access: every query the agent makes, in one place, each a short transaction.

No transaction is ever held across a hypervisor call: callers read, let go,
talk to the hypervisor, then write. Writes that must not overwrite a change
made meanwhile are conditional (compare-and-swap) and report whether they won.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, TypeAlias, TypeVar, cast

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import CursorResult, Engine
from sqlalchemy.orm import Session, sessionmaker

from compute_agent import exception, green
from compute_agent.db.engine import (
    Deadlines,
    create_engine,
    is_busy,
    normalize_url,
    unreachable_as_typed,
)
from compute_agent.db.models import Instance, InstanceAction, Service
from compute_agent.utils import utcnow

# Work done on the hub between two pauses for a server database (SQLite's
# runs in a native thread and needs none): rows turned into records when
# loading (500 held the hub for 45 ms on PostgreSQL). Between statements
# of a batch there is always a pause: on a loaded host the server answers
# before the driver reads, so a green socket never yields by itself, and
# 100 UPDATEs held the hub for 60-170 ms (10 still for 50-90 ms).
LOAD_CHUNK = 100
# Audit rows inserted between two pauses on a server database.
ACTIONS_PER_PAUSE = 10
# At most one line per this many seconds says the service row was written
# on a connection of its own, every pooled one being busy.
SIDE_CONNECTION_LOG_S = 600.0
# Domain names per IN list when looking names up (SQLite's default bound on
# parameters per statement was 999 before 3.32).
NAMES_PER_STATEMENT = 500

# ``deleted == false()``, never ``deleted IS false``: PostgreSQL uses no index
# for IS, so a host's live rows were found by scanning all its dead ones
# (bench/db_scale.py; the column is NOT NULL, so both say the same).

LOG = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(slots=True, eq=True)
class InstanceRecord:
    """An instance row as plain values: what bulk reads return.

    A host's instances are read by every sync, statistics cycle and
    listing. As ORM objects (about ten tracked objects each) 10,000 rows
    made Python's full garbage collections take 65-128 ms on the hub; a
    record is one object. It has the ORM class's attribute names, so
    writers (``instance_update``, the compare-and-set) take either.
    """

    id: int
    uuid: str
    host: str
    display_name: str | None
    domain_name: str
    vm_state: str
    task_state: str | None
    power_state: str
    vcpus: int
    memory_mb: int
    created_at: dt.datetime
    updated_at: dt.datetime | None
    deleted_at: dt.datetime | None
    deleted: bool


_RECORD_COLUMNS = tuple(f.name for f in fields(InstanceRecord))

# An instance in either form: what the writers and ``diff`` take.
AnyInstance: TypeAlias = Instance | InstanceRecord


@dataclass(frozen=True)
class HostCounts:
    """Aggregates of a host's live instances, computed by the database."""

    instances: int
    by_power_state: dict[str, int]
    vcpus: int
    memory_mb: int


def _offloaded(fn: F) -> F:
    """Run a Database method in a native thread when the database is SQLite.

    SQLite runs in the calling thread: on the hub, every statement, commit
    and WAL checkpoint (an fsync) stalled the whole agent for its duration.
    Off the hub, sqlite3 releases the GIL while it works, and Python work in
    the native thread gives the GIL back every switch interval (5 ms).
    """

    @functools.wraps(fn)
    def wrapper(self: Database, *args: Any, **kwargs: Any) -> Any:
        return self._run(fn, self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


@dataclass(frozen=True)
class Change:
    """One field of one instance moving from one value to another."""

    field: str
    old: str | None
    new: str | None


class Database:
    """An engine and the agent's queries against it."""

    def __init__(
        self,
        url: str,
        pool_size: int = 3,
        deadlines: Deadlines | None = None,
        *,
        transaction_pooling: bool = False,
    ) -> None:
        self.url = normalize_url(url)
        self.deadlines = deadlines or Deadlines()
        # SQLAlchemy hides the password it parsed, whatever its characters (a
        # space, left unquoted, would end the text masking's URL early).
        self.safe_url = self.url.render_as_string(hide_password=True)
        self.statements = 0
        self.busy_waits = 0  # connections refused for load and waited for (_connect)
        # Behind a transaction pooler each transaction runs one more
        # statement (its statement deadline, engine.py).
        self.transaction_pooling = transaction_pooling and self.url.get_driver_name() == "pg8000"
        self.engine: Engine = create_engine(
            self.url,
            pool_size,
            self.deadlines,
            self._count_one,
            transaction_pooling=transaction_pooling,
        )
        self._statements_guard = green.native_lock()  # statements run on many threads
        self._counted(self.engine)
        self.pool_size = pool_size
        # Transactions of many rows at once (_bulk_turn): all connections but one.
        self._bulk_turns: contextlib.AbstractContextManager[Any] = green.Semaphore(
            max(1, pool_size - 1)
        )
        # The service row's writes when every pooled connection is busy (a
        # sync's long transactions on a distant server held them past the
        # heartbeat's wait): a connection of their own, opened for the write
        # and closed after it, so an idle agent still holds one.
        self._side_engine: Engine | None = None
        self._side_guard = green.native_lock()
        self.side_connections = 0  # opened so, since start
        self._side_said = 0.0  # monotonic: when the last line said so
        self._transaction_pooling = transaction_pooling
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._cas_cache: dict[tuple[tuple[str, ...], tuple[tuple[str, bool], ...]], sa.Update] = {}
        # SQLite's work goes to the native thread pool, one call at a time:
        # greenthreads queue on the green semaphore (holding no thread), and
        # the native lock keeps a call whose greenthread was killed from
        # overlapping the next one (its thread runs on regardless).
        self.offloaded = self.url.get_backend_name() == "sqlite"
        self._green_turn = green.Semaphore(1)
        self._native_turn = green.native_lock()
        self._in_native = green.native_local()

    def _count(
        self, conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool
    ) -> None:
        """Count what the server runs: each row of an executemany is a statement."""
        n = len(parameters) if many else 1
        with self._statements_guard:
            self.statements += n

    def _counted(self, engine: Engine) -> None:
        event.listen(engine, "before_cursor_execute", self._count)
        for name in ("begin", "commit", "rollback"):
            event.listen(engine, name, self._count_one)

    def _count_one(self, *args: Any) -> None:
        """BEGIN, COMMIT, ROLLBACK and the pool's check run on the server too."""
        with self._statements_guard:
            self.statements += 1

    def _run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if not self.offloaded or getattr(self._in_native, "active", False):
            return fn(*args, **kwargs)
        with self._green_turn:
            return green.execute(self._run_native, fn, *args, **kwargs)

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run ``fn`` (which opens its own transaction) as this class's queries run.

        Off the hub in a native thread for SQLite, one call at a time; on
        the calling greenthread for a server database. For query modules
        of their own (``purge``).
        """
        return self._run(fn, *args, **kwargs)

    def _run_native(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        with self._native_turn:
            self._in_native.active = True
            try:
                return fn(*args, **kwargs)
            finally:
                self._in_native.active = False

    def _pause(self) -> None:
        """Let other greenthreads run between chunks of work done on the hub."""
        if not getattr(self._in_native, "active", False):
            green.yield_now()

    def dispose(self) -> None:
        self.engine.dispose()
        if self._side_engine is not None:
            self._side_engine.dispose()

    @contextlib.contextmanager
    def transaction(self, *, urgent: bool = False) -> Iterator[Session]:
        """A session inside one transaction, committed on success.

        ``urgent``: the service row's writes, which must not wait behind
        the agent's other work for a pooled connection.
        """
        with (
            unreachable_as_typed(),
            self._urgent_connect() if urgent else self._connect() as conn,
            self._sessions(bind=conn) as session,
            session.begin(),
        ):
            yield session

    @contextlib.contextmanager
    def _begin(self) -> Iterator[sa.Connection]:
        """A Core connection inside one transaction, committed on success."""
        with unreachable_as_typed(), self._connect() as conn, conn.begin():
            yield conn

    def _bulk_turn(self, rows: int) -> contextlib.AbstractContextManager[Any]:
        """A turn for a transaction of many rows: at most all pooled connections but one.

        On a distant server a sync's batch of 500 writes holds its
        connection for seconds (a round trip a row); more batches than
        connections waited out the pool's 30 s and failed, 1000 rows of
        3000 at 5 ms each way. Turns wait without a deadline, and the
        connection left over serves the heartbeat, operations and reads.
        """
        if self.offloaded or rows <= 1:
            return contextlib.nullcontext()
        return self._bulk_turns

    def _urgent_connect(self) -> sa.Connection:
        """A pooled connection if one is free, else one of its own, closed after use.

        A heartbeat that waited for the pool behind a sync's transactions
        (each row of an executemany is a round trip: seconds on a distant
        server) failed beat after beat, and the host looked down while it
        worked. SQLite has one connection, used one call at a time.
        """
        pool = self.engine.pool
        if self.offloaded or pool.checkedout() < self.pool_size:  # type: ignore[attr-defined]
            return self._connect()
        with self._side_guard:
            if self._side_engine is None:
                self._side_engine = create_engine(
                    self.url,
                    1,
                    self.deadlines,
                    self._count_one,
                    transaction_pooling=self._transaction_pooling,
                    pooled=False,
                )
                self._counted(self._side_engine)
            self.side_connections += 1
            engine, opened, now = self._side_engine, self.side_connections, green.monotonic()
            say = opened == 1 or now - self._side_said >= SIDE_CONNECTION_LOG_S
            if say:
                self._side_said = now
        if say:
            LOG.warning(
                "all %d pooled database connections busy: the service row written on a "
                "connection of its own (%d time(s) since start; a slow or distant server "
                "under a big sync?)",
                self.pool_size,
                opened,
            )
        return engine.connect()

    def _connect(self) -> sa.Connection:
        """A pooled connection; a second one refused for load waits for our first to come back.

        A server at its max_connections refuses the extra connection a
        second task of this agent asks for, while the first task's
        connection will be back in milliseconds (every transaction here is
        short). So such a refusal, while this agent holds a connection,
        is waited out (up to the connect deadline) instead of failing the
        task. Nothing has run yet: trying again is safe.
        """
        deadline = green.monotonic() + self.deadlines.connect
        pause = 0.02
        while True:
            try:
                return self.engine.connect()
            except sa.exc.DBAPIError as exc:
                # In use or back in the pool: the first task may have returned its
                # connection while this one was being refused (seen under threads).
                pool = self.engine.pool
                held = pool.checkedout() + pool.checkedin()  # type: ignore[attr-defined]
                if not (is_busy(exc.orig) and held) or green.monotonic() + pause > deadline:
                    raise
            self.busy_waits += 1
            green.sleep(pause)
            pause = min(pause * 2, 0.5)

    # -- services ---------------------------------------------------------

    @_offloaded
    def service_start(
        self,
        host: str,
        binary: str,
        owner: str | None = None,
        *,
        down_time: float | None = None,
        predecessor: str | Sequence[str] | None = None,
        before_commit: Callable[[], None] | None = None,
    ) -> Service:
        """Find or create this host's service row, claim it for ``owner``, mark it started.

        With ``down_time``, a row held by another live owner is refused with
        ServiceOwned and left untouched. It is free when it has no owner,
        is ours or a ``predecessor``'s (the tokens our lock file inherited), says
        it stopped, or its heartbeat is older than ``down_time``. The claim is
        a conditional UPDATE on what was read, so of two agents claiming at
        once one wins and the other is refused. ``before_commit`` runs once
        the claim is made, before its commit: what it raises undoes the claim.
        """
        now = utcnow()
        with self.transaction() as s:
            svc = s.scalars(
                sa.select(Service).where(Service.host == host, Service.binary == binary)
            ).one_or_none()
            if svc is None:
                svc = Service(
                    host=host,
                    binary=binary,
                    created_at=now,
                    report_count=0,
                    disabled=False,
                    started_at=now,
                    updated_at=now,
                    owner=owner,
                )
                s.add(svc)
                try:
                    s.flush()
                except sa.exc.DBAPIError as exc:
                    if not _duplicate_key(exc):
                        raise
                    raise exception.ServiceOwned(
                        f"the service row of host {host} was created by another agent "
                        "starting at the same moment"
                    ) from None
                if before_commit is not None:
                    before_commit()
                return svc
            if down_time is not None:
                held = _held_by_other(svc, owner, predecessor, down_time, now)
                if held:
                    raise exception.ServiceOwned(held)
            values = {"started_at": now, "updated_at": now, "stopped_at": None, "owner": owner}
            claimed = s.execute(
                sa.update(Service)
                .where(
                    Service.id == svc.id,
                    _same(Service.owner, svc.owner),
                    _same(Service.updated_at, svc.updated_at),
                )
                .values(**values),
                execution_options={"synchronize_session": False},
            )
            if _rowcount(claimed) != 1:
                raise exception.ServiceOwned(
                    f"the service row of host {host} was claimed by another agent "
                    "starting at the same moment"
                )
            s.expunge(svc)  # the UPDATE wrote it: no second write at commit
            for name, value in values.items():
                setattr(svc, name, value)
            if before_commit is not None:
                before_commit()
        return svc

    @_offloaded
    def service_heartbeat(self, service_id: int, owner: str | None = None) -> dt.datetime:
        """Record that the service is alive; one UPDATE, only while ``owner`` holds the row.

        Raises OwnershipLost when another agent has claimed the row since,
        ServiceNotFound when the row is gone. ``owner`` None checks nothing
        (callers that never claimed a row).
        """
        now = utcnow()
        with self.transaction(urgent=True) as s:
            stmt = sa.update(Service).where(Service.id == service_id)
            if owner is not None:
                stmt = stmt.where(Service.owner == owner)
            result = s.execute(stmt.values(updated_at=now, report_count=Service.report_count + 1))
            if _rowcount(result) != 1:
                row = s.get(Service, service_id)
                if row is None:
                    raise exception.ServiceNotFound(f"service row {service_id} is gone")
                raise exception.OwnershipLost(_owner_text(row, now))
        return now

    @_offloaded
    def service_stopped(self, service_id: int, owner: str | None = None) -> bool:
        """Mark the service stopped, only while ``owner`` holds it; whether it was."""
        with self.transaction(urgent=True) as s:
            stmt = sa.update(Service).where(Service.id == service_id)
            if owner is not None:
                stmt = stmt.where(Service.owner == owner)
            return _rowcount(s.execute(stmt.values(stopped_at=utcnow()))) == 1

    @_offloaded
    def service_get(self, host: str, binary: str) -> Service | None:
        with self.transaction() as s:
            return s.scalars(
                sa.select(Service).where(Service.host == host, Service.binary == binary)
            ).one_or_none()

    @_offloaded
    def service_get_all(self) -> list[Service]:
        with self.transaction() as s:
            return list(s.scalars(sa.select(Service).order_by(Service.host, Service.binary)))

    @_offloaded
    def service_set_disabled(
        self,
        service_id: int,
        disabled: bool,
        reason: str | None,
        *,
        only_if_reason_prefix: str | None = None,
    ) -> bool:
        """Disable or enable a service; return whether the row changed.

        With ``only_if_reason_prefix``, an enabled service or one disabled for a
        reason with that prefix is changed; a service disabled by hand is left
        alone. This is how automatic disables never undo an operator's.
        """
        stmt = sa.update(Service).where(Service.id == service_id)
        if only_if_reason_prefix is not None:
            stmt = stmt.where(
                sa.or_(
                    Service.disabled.is_(False),
                    Service.disabled_reason.startswith(only_if_reason_prefix, autoescape=True),
                )
            )
        with self.transaction() as s:
            result = s.execute(stmt.values(disabled=disabled, disabled_reason=reason))
            return _rowcount(result) == 1

    # -- instances --------------------------------------------------------

    @_offloaded
    def instance_create(self, values: Mapping[str, Any], source: str, reason: str) -> Instance:
        now = utcnow()
        with self.transaction() as s:
            exists = s.scalar(sa.select(Instance.id).where(Instance.uuid == values["uuid"]))
            if exists is not None:
                raise exception.InstanceExists(f"instance {values['uuid']} already exists")
            inst = Instance(created_at=now, updated_at=now, deleted=False, **values)
            s.add(inst)
            s.add(
                InstanceAction(
                    instance_uuid=inst.uuid,
                    action="create",
                    field="vm_state",
                    old_value=None,
                    new_value=inst.vm_state,
                    reason=_clip(reason),
                    source=source,
                    created_at=now,
                )
            )
        return inst

    @_offloaded
    def instance_get(self, uuid: str, host: str | None = None) -> Instance:
        """The live (not deleted) instance, on ``host`` if given."""
        stmt = sa.select(Instance).where(Instance.uuid == uuid, Instance.deleted == sa.false())
        if host is not None:
            stmt = stmt.where(Instance.host == host)
        with self.transaction() as s:
            inst = s.scalars(stmt).one_or_none()
        if inst is None:
            raise exception.InstanceNotFound(uuid)
        return inst

    @_offloaded
    def instance_get_all_by_host(self, host: str) -> list[InstanceRecord]:
        """Every live instance on ``host``: one SELECT, however many there are.

        Rows come as plain records, LOAD_CHUNK at a time with a pause in
        between when this runs on the hub (a server database).
        """
        table = Instance.__table__
        stmt = (
            sa.select(*(table.c[name] for name in _RECORD_COLUMNS))
            .where(table.c.host == host, table.c.deleted == sa.false())
            .order_by(table.c.id)
            .execution_options(yield_per=LOAD_CHUNK)
        )
        records: list[InstanceRecord] = []
        with self._begin() as conn:
            for chunk in conn.execute(stmt).partitions():
                records.extend(InstanceRecord(*row) for row in chunk)
                self._pause()
        return records

    @_offloaded
    def instance_get_deleted_by_domain_names(
        self, host: str, names: Iterable[str]
    ) -> list[InstanceRecord]:
        """The soft-deleted instances of ``host`` whose domain name is in ``names``.

        One transaction whatever the count: the names go NAMES_PER_STATEMENT
        to a SELECT (an IN list has a bound on every backend), so a
        hypervisor listing thousands of domains costs a handful of
        statements, not one per domain.
        """
        wanted = sorted(set(names))
        table = Instance.__table__
        columns = [table.c[name] for name in _RECORD_COLUMNS]
        records: list[InstanceRecord] = []
        with self._begin() as conn:
            for start in range(0, len(wanted), NAMES_PER_STATEMENT):
                stmt = sa.select(*columns).where(
                    table.c.host == host,
                    table.c.deleted == sa.true(),
                    table.c.domain_name.in_(wanted[start : start + NAMES_PER_STATEMENT]),
                )
                records.extend(InstanceRecord(*row) for row in conn.execute(stmt))
                self._pause()
        # Sorted here, not by the query: asked for ORDER BY id, SQLite walked
        # every dead row of the host in id order (0.7 s at 10,000) rather
        # than look the names up in (host, deleted, domain_name) and sort.
        records.sort(key=lambda r: r.id)
        return records

    @_offloaded
    def instance_counts(self, host: str) -> HostCounts:
        """Counts and sums of the host's live instances, in one grouped query.

        ``status`` asks for these on every call; loading every row to count
        it cost 76-183 ms of hub per call at 10,000 instances.
        """
        table = Instance.__table__
        stmt = (
            sa.select(
                table.c.power_state,
                sa.func.count(),
                sa.func.coalesce(sa.func.sum(table.c.vcpus), 0),
                sa.func.coalesce(sa.func.sum(table.c.memory_mb), 0),
            )
            .where(table.c.host == host, table.c.deleted == sa.false())
            .group_by(table.c.power_state)
        )
        with self._begin() as conn:
            rows = conn.execute(stmt).all()
        return HostCounts(
            instances=sum(int(r[1]) for r in rows),
            by_power_state={r[0]: int(r[1]) for r in rows},
            vcpus=sum(int(r[2]) for r in rows),
            memory_mb=sum(int(r[3]) for r in rows),
        )

    @_offloaded
    def instance_update(
        self,
        inst: AnyInstance,
        values: Mapping[str, Any],
        *,
        action: str,
        source: str,
        reason: str = "",
        expected: Mapping[str, Any] | None = None,
        record: bool = True,
    ) -> list[Change]:
        """Write ``values`` to ``inst`` and its audit rows in one transaction.

        ``expected`` makes the write conditional: it happens only if the row
        still holds those values, and InstanceInvalidState is raised if not.
        ``inst`` is updated in place on success. Returns the changes made.
        """
        changes = diff(inst, values)
        if not changes:
            return []
        now = utcnow()
        with self.transaction() as s:
            stmt = sa.update(Instance).where(Instance.id == inst.id, Instance.deleted == sa.false())
            for name, value in (expected or {}).items():
                col = getattr(Instance, name)
                stmt = stmt.where(col.is_(None) if value is None else col == value)
            result = s.execute(stmt.values(updated_at=now, **values))
            if _rowcount(result) != 1:
                raise exception.InstanceInvalidState(
                    f"instance {inst.uuid} changed meanwhile; {action} not applied"
                )
            if record:
                s.execute(
                    sa.insert(InstanceAction),
                    action_rows(inst.uuid, changes, action, source, reason, now),
                )
        for name, value in values.items():
            setattr(inst, name, value)
        inst.updated_at = now
        return changes

    def instance_compare_and_set(
        self, inst: AnyInstance, values: Mapping[str, Any], expected: Mapping[str, Any]
    ) -> bool:
        """One conditional UPDATE with no audit row; True if it won."""
        return self.instance_compare_and_set_many([(inst, values, expected, [])])[0]

    @_offloaded
    def instance_compare_and_set_many(
        self,
        writes: Sequence[
            tuple[AnyInstance, Mapping[str, Any], Mapping[str, Any], Sequence[Mapping[str, Any]]]
        ],
    ) -> list[bool]:
        """Conditional UPDATEs and their audit rows in one transaction; which won.

        Each write is (instance, values, expected, audit rows); the audit
        rows of the writes that won are inserted in the same transaction,
        so a crash never leaves a change without its record. Each UPDATE is
        its own statement, so each outcome is known; sharing the commit is
        what makes a sync that changes thousands of rows fast. The
        statements are cached Core statements: an ORM session per row costs
        several times more.
        """
        now = utcnow()
        with self._bulk_turn(len(writes)), self._begin() as conn:
            if self.offloaded and self.engine.dialect.supports_sane_multi_rowcount:
                outcomes = self._cas_grouped(conn, writes, now)
            else:
                outcomes = []
                for inst, values, expected, _audit in writes:
                    self._pause()
                    stmt, params = self._cas_params(inst, values, expected, now)
                    outcomes.append(conn.execute(stmt, params).rowcount == 1)
            audit = [
                row
                for (_i, _v, _e, rows), won in zip(writes, outcomes, strict=True)
                if won
                for row in rows
            ]
            self._insert_actions(conn, audit)
        for (inst, values, _expected, _audit), won in zip(writes, outcomes, strict=True):
            if won:
                for name, value in values.items():
                    setattr(inst, name, value)
                inst.updated_at = now
        return outcomes

    def _insert_actions(self, conn: sa.Connection, rows: Sequence[Mapping[str, Any]]) -> None:
        """Insert audit rows: at once on SQLite, ACTIONS_PER_PAUSE at a time elsewhere.

        pg8000 runs an executemany as one statement per row, each costing
        about 0.4 ms of hub CPU (its parameter parsing is pure Python), and
        a multi-row VALUES costs more (23 ms to parse 100 rows): on the hub
        they go in small slices with a pause between.
        """
        if not rows:
            return
        table = cast(sa.Table, InstanceAction.__table__)
        step = len(rows) if self.offloaded else ACTIONS_PER_PAUSE
        for start in range(0, len(rows), step):
            self._pause()
            conn.execute(table.insert(), list(rows[start : start + step]))

    def _cas_params(
        self, inst: AnyInstance, values: Mapping[str, Any], expected: Mapping[str, Any], now: Any
    ) -> tuple[sa.Update, dict[str, Any]]:
        stmt = self._cas_statement(
            tuple(values), tuple((k, v is None) for k, v in expected.items())
        )
        params = {"b_id": inst.id, "n_updated_at": now}
        params.update({f"n_{k}": v for k, v in values.items()})
        params.update({f"b_{k}": v for k, v in expected.items() if v is not None})
        return stmt, params

    def _cas_grouped(
        self,
        conn: sa.Connection,
        writes: Sequence[tuple[AnyInstance, Mapping[str, Any], Mapping[str, Any], Any]],
        now: Any,
    ) -> list[bool]:
        """The same UPDATEs as one executemany per statement shape; which won.

        Only off the hub (SQLite, in its native thread), where one long call
        stalls nothing: the per-row statements cost most of a sync that
        changes thousands of rows. When a group's row count says some lost,
        the winners are the rows that now carry this transaction's
        ``updated_at`` (read inside the transaction, so only its own writes
        can have set it).
        """
        groups: dict[sa.Update, list[tuple[int, dict[str, Any]]]] = {}
        for index, (inst, values, expected, _audit) in enumerate(writes):
            stmt, params = self._cas_params(inst, values, expected, now)
            groups.setdefault(stmt, []).append((index, params))
        ids = [inst.id for inst, *_rest in writes]
        if len(set(ids)) != len(ids):  # one row written twice: only one at a time can win
            return [conn.execute(*self._cas_params(*w[:3], now)).rowcount == 1 for w in writes]
        outcomes = [True] * len(writes)
        table = cast(sa.Table, Instance.__table__)
        for stmt, rows in groups.items():
            if conn.execute(stmt, [params for _i, params in rows]).rowcount == len(rows):
                continue
            won = set(
                conn.scalars(
                    sa.select(table.c.id).where(
                        table.c.id.in_([params["b_id"] for _i, params in rows]),
                        table.c.updated_at == now,
                    )
                )
            )
            for index, params in rows:
                outcomes[index] = params["b_id"] in won
        return outcomes

    def _cas_statement(
        self, set_keys: tuple[str, ...], expect_keys: tuple[tuple[str, bool], ...]
    ) -> sa.Update:
        key = (set_keys, expect_keys)
        stmt = self._cas_cache.get(key)
        if stmt is None:
            table = cast(sa.Table, Instance.__table__)
            where = [table.c.id == sa.bindparam("b_id"), table.c.deleted == sa.false()]
            for name, is_null in expect_keys:
                col = table.c[name]
                where.append(col.is_(None) if is_null else col == sa.bindparam(f"b_{name}"))
            new: dict[str, sa.BindParameter[Any]] = {
                name: sa.bindparam(f"n_{name}") for name in (*set_keys, "updated_at")
            }
            stmt = sa.update(table).where(*where).values(**new)
            self._cas_cache[key] = stmt
        return stmt

    @_offloaded
    def instance_soft_delete(self, inst: AnyInstance, source: str, reason: str) -> None:
        now = utcnow()
        # The domain is gone with the row: power_state says so (nothing runs).
        changes = diff(inst, {"power_state": "nostate", "vm_state": "deleted", "task_state": None})
        with self.transaction() as s:
            s.execute(
                sa.update(Instance)
                .where(Instance.id == inst.id)
                .values(
                    vm_state="deleted",
                    task_state=None,
                    power_state="nostate",
                    deleted=True,
                    deleted_at=now,
                    updated_at=now,
                )
            )
            s.execute(
                sa.insert(InstanceAction),
                action_rows(inst.uuid, changes, "delete", source, reason, now),
            )
        inst.vm_state, inst.task_state, inst.deleted, inst.deleted_at = "deleted", None, True, now
        inst.power_state = "nostate"

    # -- the audit trail --------------------------------------------------

    @_offloaded
    def actions_add(self, rows: Iterable[Mapping[str, Any]]) -> int:
        """Insert journalled audit rows in one statement; return how many."""
        rows = list(rows)
        if rows:
            # Core, not the ORM's bulk path: a sync may journal thousands of rows.
            with self._begin() as conn:
                self._insert_actions(conn, rows)
        return len(rows)

    @_offloaded
    def actions_get(self, uuid: str, limit: int = 100) -> list[InstanceAction]:
        with self.transaction() as s:
            return list(
                s.scalars(
                    sa.select(InstanceAction)
                    .where(InstanceAction.instance_uuid == uuid)
                    .order_by(InstanceAction.id.desc())
                    .limit(limit)
                )
            )


def _duplicate_key(exc: sa.exc.DBAPIError) -> bool:
    """Whether a unique constraint refused the row.

    Most drivers raise IntegrityError; pg8000 raises a plain DatabaseError
    whose first argument holds SQLSTATE 23505, so the agent that lost the
    race to create its host's row crashed with it instead of being refused.
    """
    if isinstance(exc, sa.exc.IntegrityError):
        return True
    args = getattr(exc.orig, "args", None) or (None,)
    return isinstance(args[0], dict) and args[0].get("C") == "23505"


def _rowcount(result: object) -> int:
    """Rows an UPDATE matched: ``Session.execute`` is typed to return a plain
    ``Result`` in SQLAlchemy 2.1, but a DML statement's is a ``CursorResult``."""
    return cast("CursorResult[Any]", result).rowcount


def _same(column: Any, value: Any) -> Any:
    """``column`` equals ``value``, NULL matching NULL."""
    return column.is_(None) if value is None else column == value


def _owner_text(row: Service, now: dt.datetime) -> str:
    """Who holds ``row``, as the refused or displaced agent says it."""
    age = f"{(now - row.updated_at).total_seconds():.0f} s ago" if row.updated_at else "never"
    return (
        f"host {row.host} is held by another compute-agent (owner token {(row.owner or '-')[:8]}, "
        f"last heartbeat {age})"
    )


def _held_by_other(
    row: Service,
    owner: str | None,
    predecessor: str | Sequence[str] | None,
    down_time: float,
    now: dt.datetime,
) -> str:
    """Why ``row`` may not be claimed by ``owner``; empty when it may."""
    ours = (predecessor,) if isinstance(predecessor, str) else tuple(predecessor or ())
    if row.owner is None or row.owner == owner or row.owner in ours or row.stopped_at is not None:
        return ""
    if row.updated_at is None or (now - row.updated_at).total_seconds() > down_time:
        return ""
    return (
        _owner_text(row, now)
        + f"; it is up (service_down_time {down_time:.0f} s): stop it first, or wait until "
        "its heartbeat is that old if it is gone"
    )


def diff(inst: AnyInstance, values: Mapping[str, Any]) -> list[Change]:
    """The state fields of ``values`` that differ from ``inst``."""
    return [
        Change(name, _str(getattr(inst, name)), _str(value))
        for name, value in values.items()
        if getattr(inst, name) != value
    ]


def action_rows(
    uuid: str,
    changes: Iterable[Change],
    action: str,
    source: str,
    reason: str,
    when: dt.datetime,
) -> list[dict[str, Any]]:
    return [
        {
            "instance_uuid": uuid,
            "action": action,
            "field": c.field,
            "old_value": c.old,
            "new_value": c.new,
            "reason": _clip(reason),
            "source": str(source),
            "created_at": when,
        }
        for c in changes
    ]


def _str(value: Any) -> str | None:
    return None if value is None else str(value)


def _clip(text: str | None, limit: int = 255) -> str | None:
    if text is None:
        return None
    return text if len(text) <= limit else text[: limit - 3] + "..."
