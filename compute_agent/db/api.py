"""Data access: every query the agent makes, in one place, each a short transaction.

No transaction is ever held across a hypervisor call: callers read, let go,
talk to the hypervisor, then write. Writes that must not overwrite a change
made meanwhile are conditional (compare-and-swap) and report whether they won.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.orm import Session, sessionmaker

from compute_agent import exception, green
from compute_agent.db.models import Instance, InstanceAction, Service
from compute_agent.utils import utcnow

# Rows turned into objects between two yields when loading a host's
# instances: building 10,000 ORM objects at once holds the hub for 80 ms of
# our own work on SQLite, several times that on PostgreSQL
# (bench/instance_load.py).
LOAD_CHUNK = 500


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


def _statement_deadline(seconds: float) -> Any:
    """A ``connect`` listener: once connected, a read may wait ``seconds``.

    Each driver keeps its socket deadline in an attribute of its own
    (tests/unit/test_db_deadlines.py notices a driver renaming it).
    """

    def on_connect(dbapi_conn: Any, _record: Any) -> None:
        sock = getattr(dbapi_conn, "_usock", None)  # pg8000
        if sock is not None:
            sock.settimeout(seconds)
        if hasattr(dbapi_conn, "_read_timeout"):  # PyMySQL: applied at its next read/write
            dbapi_conn._read_timeout = dbapi_conn._write_timeout = seconds

    return on_connect


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
            # One connection, handed from greenthread to greenthread by a green
            # queue: SQLite's own busy-wait would block the hub instead.
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
        if self.url.get_backend_name() == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self.statements = 0
        event.listen(self.engine, "before_cursor_execute", self._count)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._cas_cache: dict[tuple, sa.Update] = {}

    def _count(self, *args: Any) -> None:
        self.statements += 1

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

    def service_stopped(self, service_id: int) -> None:
        with self.transaction() as s:
            s.execute(
                sa.update(Service).where(Service.id == service_id).values(stopped_at=utcnow())
            )

    def service_get(self, host: str, binary: str) -> Service | None:
        with self.transaction() as s:
            return s.scalars(
                sa.select(Service).where(Service.host == host, Service.binary == binary)
            ).one_or_none()

    def service_get_all(self) -> list[Service]:
        with self.transaction() as s:
            return list(s.scalars(sa.select(Service).order_by(Service.host, Service.binary)))

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

    def instance_get_all_by_host(self, host: str) -> list[Instance]:
        """Every live instance on ``host``: one SELECT, however many there are.

        The rows become objects LOAD_CHUNK at a time with a yield in between,
        so loading a large host never holds the hub.
        """
        stmt = (
            sa.select(Instance)
            .where(Instance.host == host, Instance.deleted.is_(False))
            .order_by(Instance.id)
            .execution_options(yield_per=LOAD_CHUNK)
        )
        instances: list[Instance] = []
        with self.transaction() as s:
            for chunk in s.scalars(stmt).partitions():
                instances.extend(chunk)
                green.yield_now()
        return instances

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
        self, inst: Instance, values: Mapping[str, Any], expected: Mapping[str, Any]
    ) -> bool:
        """One conditional UPDATE with no audit row; True if it won."""
        return self.instance_compare_and_set_many([(inst, values, expected)])[0]

    def instance_compare_and_set_many(
        self, writes: Sequence[tuple[Instance, Mapping[str, Any], Mapping[str, Any]]]
    ) -> list[bool]:
        """Several conditional UPDATEs in one transaction; whether each one won.

        Each is its own statement, so each outcome is known; sharing the
        commit is what makes a sync that changes thousands of rows fast. The
        statements are cached Core statements: an ORM session per row costs
        several times more.
        """
        now = utcnow()
        outcomes = []
        with self._begin() as conn:
            for inst, values, expected in writes:
                stmt = self._cas_statement(
                    tuple(values), tuple((k, v is None) for k, v in expected.items())
                )
                params = {"b_id": inst.id, "n_updated_at": now}
                params.update({f"n_{k}": v for k, v in values.items()})
                params.update({f"b_{k}": v for k, v in expected.items() if v is not None})
                outcomes.append(conn.execute(stmt, params).rowcount == 1)
        for (inst, values, _expected), won in zip(writes, outcomes, strict=True):
            if won:
                for name, value in values.items():
                    setattr(inst, name, value)
                inst.updated_at = now
        return outcomes

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

    def instance_soft_delete(self, inst: Instance, source: str, reason: str) -> None:
        now = utcnow()
        changes = diff(inst, {"vm_state": "deleted", "task_state": None})
        with self.transaction() as s:
            s.execute(
                sa.update(Instance)
                .where(Instance.id == inst.id)
                .values(
                    vm_state="deleted",
                    task_state=None,
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

    # -- the audit trail --------------------------------------------------

    def actions_add(self, rows: Iterable[Mapping[str, Any]]) -> int:
        """Insert journalled audit rows in one statement; return how many."""
        rows = list(rows)
        if rows:
            # Core, not the ORM's bulk path: a sync may journal thousands of rows.
            with self._begin() as conn:
                conn.execute(InstanceAction.__table__.insert(), rows)
        return len(rows)

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


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    # WAL lets the admin CLI read while the agent writes.
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()
