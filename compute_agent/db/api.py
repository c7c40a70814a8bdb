"""Data access: every query the agent makes, in one place, each a short transaction.

No transaction is ever held across a hypervisor call: callers read, let go,
talk to the hypervisor, then write. Writes that must not overwrite a change
made meanwhile are conditional (compare-and-swap) and report whether they won.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import ssl
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.orm import Session, sessionmaker

from compute_agent import exception, green
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


@contextlib.contextmanager
def _unreachable_as_typed() -> Iterator[None]:
    """A lost, refused or silent database connection as DatabaseUnavailable.

    An outage then reaches callers as one typed line (and RPC callers as
    the documented HypervisorUnavailable) instead of a driver's exception
    and its traceback for every request; the pool's pre-ping reconnects on
    the next use once the server is back.
    """
    try:
        yield
    except sa.exc.DBAPIError as exc:
        # A connection lost mid-use (the dialect says so: a socket timeout is
        # one) or none made at all (no statement yet). SQLite and MySQL report
        # a bad column as an OperationalError too, so the class alone would
        # not tell.
        if not (exc.connection_invalidated or exc.statement is None):
            raise
        raise exception.DatabaseUnavailable(f"database unavailable: {_reason(exc.orig)}") from exc
    except sa.exc.TimeoutError as exc:
        # Every pooled connection is busy (stuck on a silent server) for the
        # pool's whole wait.
        raise exception.DatabaseUnavailable(
            f"database unavailable: no pooled connection free: {_reason(exc)}"
        ) from exc
    except OSError as exc:
        # A socket error no driver wrapped: pg8000 lets a timeout of its SSL
        # probe, and of the first read of every answer, through bare. The
        # timed-out socket never reads again; the pool's pre-ping drops it.
        raise exception.DatabaseUnavailable(f"database unavailable: {_reason(exc)}") from exc


# For the migration helpers, which use the engine directly.
unreachable_as_typed = _unreachable_as_typed


def _reason(error: BaseException | None) -> str:
    """``Type: first line``, and the socket error a driver wrapped.

    pg8000's 'network error' alone would hide that it was a timeout.
    """
    if error is None:
        return ""
    text = f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:200]}"
    cause = error.__cause__
    if isinstance(cause, OSError):
        text += f" ({type(cause).__name__}: {str(cause)[:100] or 'no detail'})"
    return text


@dataclass(frozen=True)
class Deadlines:
    """How long each kind of database wait may last, in seconds ([database])."""

    connect: float = 5.0
    statement: float = 30.0
    sqlite_busy: float = 5.0

    @classmethod
    def from_conf(cls, group: Any) -> Deadlines:
        return cls(group.connect_timeout, group.statement_timeout, group.sqlite_busy_timeout)


def connect_args(url: URL, deadlines: Deadlines) -> dict[str, Any]:
    """The driver's own arguments that put ``deadlines`` on every wait.

    The connect deadline bounds the whole opening (TCP, SSL probe,
    handshake, login) because both drivers read with it until connected;
    :func:`_statement_deadline` then widens reads to the statement deadline.
    """
    if url.get_backend_name() == "sqlite":
        return {"check_same_thread": False, "timeout": deadlines.sqlite_busy}
    driver = url.get_driver_name()
    if driver == "pg8000":
        # PostgreSQL takes any setting as a startup parameter: the server
        # cancels a long statement itself and the connection stays usable.
        ms = str(max(1, round(deadlines.statement * 1000)))
        return {"timeout": deadlines.connect, "startup_params": {"statement_timeout": ms}}
    if driver == "pymysql":
        seconds = deadlines.connect
        return {"connect_timeout": seconds, "read_timeout": seconds, "write_timeout": seconds}
    return {}


def _set_read_deadline(dbapi_conn: Any, seconds: float) -> None:
    """Let a read on ``dbapi_conn`` wait at most ``seconds``.

    Each driver keeps its socket deadline in an attribute of its own
    (tests/unit/test_db_deadlines.py notices a driver renaming it).
    """
    sock = getattr(dbapi_conn, "_usock", None)  # pg8000
    if sock is not None:
        sock.settimeout(seconds)
    if hasattr(dbapi_conn, "_read_timeout"):  # PyMySQL: applied at its next read/write
        dbapi_conn._read_timeout = dbapi_conn._write_timeout = seconds


def _statement_deadline(seconds: float) -> Any:
    """A ``connect`` listener: once connected, a read may wait ``seconds``."""

    def on_connect(dbapi_conn: Any, _record: Any) -> None:
        _set_read_deadline(dbapi_conn, seconds)

    return on_connect


def _ping_deadline(engine: Engine, deadlines: Deadlines, counted: Callable[[], None]) -> None:
    """The pool's check of a pooled connection waits the connect deadline, not a statement's.

    A ``SELECT 1`` has nothing to compute: a server that does not answer it
    within the connect deadline is as good as unreachable. With the
    statement deadline (30 s) a silent server kept every caller, the
    heartbeat included, waiting 30 s before the pool even tried a new
    connection.
    """
    dialect = engine.dialect
    ping = dialect.do_ping

    def do_ping(dbapi_conn: Any) -> bool:
        counted()
        _set_read_deadline(dbapi_conn, deadlines.connect)
        try:
            return bool(ping(dbapi_conn))
        finally:
            _set_read_deadline(dbapi_conn, deadlines.statement)

    dialect.do_ping = do_ping  # type: ignore[method-assign]


# Pure-Python drivers: their sockets are green once the agent is monkey-patched,
# so a slow query never stalls the hub.
_DEFAULT_DRIVERS = {
    "postgresql": "postgresql+pg8000",
    "mysql": "mysql+pymysql",
    "mariadb": "mariadb+pymysql",
}


def normalize_url(url: str) -> URL:
    """Parse ``url``, choosing the green-friendly driver when none is named."""
    try:
        parsed = make_url(url)
    except (sa.exc.ArgumentError, ValueError) as exc:
        raise exception.InvalidInput(f"invalid database URL: {exc}") from None
    driver = _DEFAULT_DRIVERS.get(parsed.drivername)
    return parsed.set(drivername=driver) if driver else parsed


def mask_url(url: str) -> str:
    """The URL with its password replaced by ``***``, fit for logs and CLI output."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (sa.exc.ArgumentError, ValueError):
        return "<unparseable database URL>"


@dataclass(frozen=True)
class Change:
    """One field of one instance moving from one value to another."""

    field: str
    old: str | None
    new: str | None


class Database:
    """An engine and the agent's queries against it."""

    def __init__(self, url: str, pool_size: int = 5, deadlines: Deadlines | None = None) -> None:
        self.url = normalize_url(url)
        self.deadlines = deadlines or Deadlines()
        self.safe_url = self.url.render_as_string(hide_password=True)
        kwargs: dict[str, Any] = {"pool_pre_ping": True}
        if self.url.get_backend_name() == "sqlite":
            # One connection: every call runs in a native thread, one at a time.
            kwargs.update(
                poolclass=sa.pool.QueuePool,
                pool_size=1,
                max_overflow=0,
            )
        else:
            kwargs.update(pool_size=pool_size, max_overflow=pool_size, pool_recycle=3600)
        kwargs["connect_args"] = connect_args(self.url, self.deadlines)
        self.engine: Engine = sa.create_engine(self.url, **kwargs)
        event.listen(self.engine, "connect", _statement_deadline(self.deadlines.statement))
        self.statements = 0
        _ping_deadline(self.engine, self.deadlines, self._count_one)
        if self.url.get_backend_name() == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        if self.url.get_driver_name() == "pg8000":
            event.listen(self.engine, "do_connect", _Pg8000PreferSSL().connect)
        event.listen(self.engine, "before_cursor_execute", self._count)
        for name in ("begin", "commit", "rollback"):
            event.listen(self.engine, name, self._count_one)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._cas_cache: dict[tuple, sa.Update] = {}
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
        self.statements += len(parameters) if many else 1

    def _count_one(self, *args: Any) -> None:
        """BEGIN, COMMIT, ROLLBACK and the pool's check run on the server too."""
        self.statements += 1

    def _run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if not self.offloaded or getattr(self._in_native, "active", False):
            return fn(*args, **kwargs)
        with self._green_turn:
            return green.execute(self._run_native, fn, *args, **kwargs)

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

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Session]:
        """A session inside one transaction, committed on success."""
        with _unreachable_as_typed(), self._sessions.begin() as session:
            yield session

    @contextlib.contextmanager
    def _begin(self) -> Iterator[sa.Connection]:
        """A Core connection inside one transaction, committed on success."""
        with _unreachable_as_typed(), self.engine.begin() as conn:
            yield conn

    # -- services ---------------------------------------------------------

    @_offloaded
    def service_start(self, host: str, binary: str) -> Service:
        """Find or create this host's service row and mark it started."""
        now = utcnow()
        with self.transaction() as s:
            svc = s.scalars(
                sa.select(Service).where(Service.host == host, Service.binary == binary)
            ).one_or_none()
            if svc is None:
                svc = Service(
                    host=host, binary=binary, created_at=now, report_count=0, disabled=False
                )
                s.add(svc)
            svc.started_at = now
            svc.updated_at = now
            svc.stopped_at = None
        return svc

    @_offloaded
    def service_heartbeat(self, service_id: int) -> dt.datetime:
        """Record that the service is alive; one UPDATE."""
        now = utcnow()
        with self.transaction() as s:
            result = s.execute(
                sa.update(Service)
                .where(Service.id == service_id)
                .values(updated_at=now, report_count=Service.report_count + 1)
            )
            if result.rowcount != 1:
                raise exception.ServiceNotFound(f"service row {service_id} is gone")
        return now

    @_offloaded
    def service_stopped(self, service_id: int) -> None:
        with self.transaction() as s:
            s.execute(
                sa.update(Service).where(Service.id == service_id).values(stopped_at=utcnow())
            )

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
            return result.rowcount == 1

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
        stmt = sa.select(Instance).where(Instance.uuid == uuid, Instance.deleted.is_(False))
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
            .where(table.c.host == host, table.c.deleted.is_(False))
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
            .where(table.c.host == host, table.c.deleted.is_(False))
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
        inst: Instance,
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
            stmt = sa.update(Instance).where(Instance.id == inst.id, Instance.deleted.is_(False))
            for name, value in (expected or {}).items():
                col = getattr(Instance, name)
                stmt = stmt.where(col.is_(None) if value is None else col == value)
            result = s.execute(stmt.values(updated_at=now, **values))
            if result.rowcount != 1:
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
        self, inst: Any, values: Mapping[str, Any], expected: Mapping[str, Any]
    ) -> bool:
        """One conditional UPDATE with no audit row; True if it won."""
        return self.instance_compare_and_set_many([(inst, values, expected, [])])[0]

    @_offloaded
    def instance_compare_and_set_many(
        self,
        writes: Sequence[
            tuple[Any, Mapping[str, Any], Mapping[str, Any], Sequence[Mapping[str, Any]]]
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
        outcomes = []
        with self._begin() as conn:
            for inst, values, expected, _audit in writes:
                self._pause()
                stmt = self._cas_statement(
                    tuple(values), tuple((k, v is None) for k, v in expected.items())
                )
                params = {"b_id": inst.id, "n_updated_at": now}
                params.update({f"n_{k}": v for k, v in values.items()})
                params.update({f"b_{k}": v for k, v in expected.items() if v is not None})
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
        table = InstanceAction.__table__
        step = len(rows) if self.offloaded else ACTIONS_PER_PAUSE
        for start in range(0, len(rows), step):
            self._pause()
            conn.execute(table.insert(), list(rows[start : start + step]))

    def _cas_statement(
        self, set_keys: tuple[str, ...], expect_keys: tuple[tuple[str, bool], ...]
    ) -> sa.Update:
        key = (set_keys, expect_keys)
        stmt = self._cas_cache.get(key)
        if stmt is None:
            table = Instance.__table__
            where = [table.c.id == sa.bindparam("b_id"), table.c.deleted.is_(False)]
            for name, is_null in expect_keys:
                col = table.c[name]
                where.append(col.is_(None) if is_null else col == sa.bindparam(f"b_{name}"))
            new = {name: sa.bindparam(f"n_{name}") for name in (*set_keys, "updated_at")}
            stmt = sa.update(table).where(*where).values(**new)
            self._cas_cache[key] = stmt
        return stmt

    @_offloaded
    def instance_soft_delete(self, inst: Instance, source: str, reason: str) -> None:
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


def diff(inst: Instance, values: Mapping[str, Any]) -> list[Change]:
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


class _Pg8000PreferSSL:
    """pg8000's own "SSL if the server offers it", with one SSL context, not one per connection.

    Given no context, pg8000 builds a default one for every connection,
    loading the system's CA store to then verify nothing: 60-155 ms of hub
    CPU each time the pool opens a connection. This builds the same context
    (no verification, as pg8000 does) once, and falls back to plain TCP for
    good when the server refuses SSL, as pg8000 would. A context the
    operator passes is left alone.
    """

    def __init__(self) -> None:
        self._context: ssl.SSLContext | bool | None = None

    def connect(self, _dialect: Any, _record: Any, cargs: Any, cparams: dict[str, Any]) -> Any:
        if "ssl_context" in cparams:
            return None  # the operator's choice: SQLAlchemy connects as usual
        if self._context is None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            self._context = context
        import pg8000.dbapi  # the driver of this URL, already loaded by SQLAlchemy

        try:
            return pg8000.dbapi.connect(*cargs, ssl_context=self._context, **cparams)
        except pg8000.dbapi.InterfaceError as exc:
            if self._context is False or "refuses SSL" not in str(exc):
                raise
        self._context = False
        return pg8000.dbapi.connect(*cargs, ssl_context=False, **cparams)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    # WAL lets the admin CLI read while the agent writes.
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()
