"""The database engine: drivers, deadlines and the errors an outage raises.

How the agent connects, not what it asks: the pure-Python driver for each
server (green sockets), a deadline on every wait, one SSL context for
pg8000, SQLite's pragmas, and a lost, refused or silent connection turned
into ``DatabaseUnavailable``. ``api.py`` holds the queries.
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import URL, Engine, make_url

from compute_agent import exception


def create_engine(
    url: URL,
    pool_size: int,
    deadlines: Deadlines,
    counted: Callable[[], None],
    *,
    transaction_pooling: bool = False,
    pooled: bool = True,
) -> Engine:
    """An engine for ``url`` with ``deadlines`` on every wait.

    ``pooled`` False: a connection per use, closed after it (the
    heartbeat's, when every pooled one is busy).

    ``counted`` is called for each statement SQLAlchemy's events do not
    see: the pool's check of a pooled connection, and the per-transaction
    deadline of ``transaction_pooling``.

    The connection budget of a server database: one connection kept open
    between uses (an idle agent holds one), up to ``pool_size`` at once
    under load, the extra ones closed as they are given back. A fleet of
    hosts then costs the server one connection per idle host.
    """
    kwargs: dict[str, Any] = {"pool_pre_ping": pooled}
    if not pooled:
        kwargs.update(poolclass=sa.pool.NullPool)
    elif url.get_backend_name() == "sqlite":
        # One connection: every call runs in a native thread, one at a time.
        kwargs.update(poolclass=sa.pool.QueuePool, pool_size=1, max_overflow=0)
    else:
        kwargs.update(
            poolclass=sa.pool.QueuePool,
            pool_size=1,
            max_overflow=max(0, pool_size - 1),
            pool_recycle=3600,
        )
    behind_pooler = transaction_pooling and url.get_driver_name() == "pg8000"
    kwargs["connect_args"] = connect_args(url, deadlines, transaction_pooling=behind_pooler)
    engine = sa.create_engine(url, **kwargs)
    event.listen(engine, "connect", _statement_deadline(deadlines.statement))
    if behind_pooler:
        _transaction_deadline(engine, deadlines.statement, counted)
    _ping_deadline(engine, deadlines, counted)
    if url.get_backend_name() == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    if url.get_driver_name() == "pg8000":
        event.listen(engine, "do_connect", _Pg8000PreferSSL().connect)
    return engine


@contextlib.contextmanager
def unreachable_as_typed() -> Iterator[None]:
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
        if is_timeout(exc.orig):
            reason = _reason(exc.orig)
            raise exception.DatabaseUnavailable(
                f"database unavailable: no answer within the statement deadline: {reason}"
            ) from exc
        if not (exc.connection_invalidated or exc.statement is None):
            raise
        unavailable = exception.DatabaseBusy if is_busy(exc.orig) else exception.DatabaseUnavailable
        raise unavailable(f"database unavailable: {_reason(exc.orig)}") from exc
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


# Refusals for load, which a wait cures: PostgreSQL's SQLSTATEs (class 53,
# insufficient resources: too many clients, for the server, a role or a
# database; 57P03, starting up), MariaDB's error numbers (1040 too many
# connections, 1203/1226 a user's connection limit, 1135 no thread), and
# PgBouncer's refusals, which it sends as protocol errors (08P01) and tells
# apart only by their text.
_BUSY_SQLSTATES = frozenset({"53000", "53200", "53300", "53400", "57P03"})
_BUSY_MYSQL_ERRORS = frozenset({1040, 1135, 1203, 1226})
_BUSY_POOLER_TEXTS = (
    "no more connections allowed",  # max_client_conn
    "query_wait_timeout",  # no server connection free in time
    "pgbouncer cannot connect to server",  # the server refused PgBouncer
    "server login has been failing",
)


# A statement the server gave up on at its deadline, the connection still
# good: PostgreSQL's 57014 (statement_timeout) and 55P03 (lock_timeout);
# MariaDB's 1205 (lock wait timeout), 1969 (max_statement_time), MySQL's 3024.
_TIMEOUT_SQLSTATES = frozenset({"57014", "55P03"})
_TIMEOUT_MYSQL_ERRORS = frozenset({1205, 1969, 3024})


def _code(error: BaseException) -> str | int | None:
    """The server's error code: pg8000's SQLSTATE, PyMySQL's errno."""
    args = getattr(error, "args", ())
    first = args[0] if args else None
    if isinstance(first, dict):
        code = first.get("C")
        return str(code) if code is not None else None
    return first if isinstance(first, int) else None


def is_timeout(error: BaseException | None) -> bool:
    """Whether a driver's ``error`` is the server ending a statement at its deadline."""
    if error is None:
        return False
    code = _code(error)
    return code in _TIMEOUT_SQLSTATES or code in _TIMEOUT_MYSQL_ERRORS


def is_busy(error: BaseException | None) -> bool:
    """Whether a driver's ``error`` is a refusal for load that a retry can cure."""
    if error is None:
        return False
    args = getattr(error, "args", ())
    first = args[0] if args else None
    if isinstance(first, dict):  # pg8000: the server's error fields
        if first.get("C") in _BUSY_SQLSTATES:
            return True
        text = str(first.get("M", "")).lower()
        return any(needle in text for needle in _BUSY_POOLER_TEXTS)
    if isinstance(first, int):  # PyMySQL: (errno, message)
        return first in _BUSY_MYSQL_ERRORS
    return False


def _reason(error: BaseException | None) -> str:
    """``Type: first line``, and the socket error a driver wrapped.

    pg8000's 'network error' alone would hide that it was a timeout.
    """
    if error is None:
        return ""
    args = getattr(error, "args", ())
    if args and isinstance(args[0], dict) and "M" in args[0]:  # pg8000: the server's fields
        detail = f"{args[0]['M']} (SQLSTATE {args[0].get('C', '?')})"
    else:
        detail = str(error)
    text = f"{type(error).__name__}: {(detail.splitlines() or [''])[0][:200]}"
    if "unsupported startup parameter" in text:
        text += " (a PgBouncer? set [database] transaction_pooling = true)"
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


def connect_args(
    url: URL, deadlines: Deadlines, *, transaction_pooling: bool = False
) -> dict[str, Any]:
    """The driver's own arguments that put ``deadlines`` on every wait.

    The connect deadline bounds the whole opening (TCP, SSL probe,
    handshake, login) because both drivers read with it until connected;
    :func:`_statement_deadline` then widens reads to the statement deadline.
    Through a transaction pooler the server's statement deadline is set
    per transaction instead (:func:`_transaction_deadline`).
    """
    if url.get_backend_name() == "sqlite":
        return {"check_same_thread": False, "timeout": deadlines.sqlite_busy}
    driver = url.get_driver_name()
    if driver == "pg8000" and transaction_pooling:
        # PgBouncer refuses a startup parameter it does not know (08P01),
        # and a session setting would stay on whichever server connection
        # ran it, not follow this client.
        return {"timeout": deadlines.connect}
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


def _transaction_deadline(engine: Engine, seconds: float, counted: Callable[[], None]) -> None:
    """PostgreSQL's statement deadline set at the start of each transaction, for it only.

    Behind a transaction-pooling PgBouncer each transaction may run on a
    different server connection: ``SET LOCAL`` lasts exactly the
    transaction, so it holds wherever the transaction runs and leaves
    nothing behind for the next client of that server connection. One
    more statement per transaction, hence only in this mode. Run as the
    dialect's BEGIN, so a failure is SQLAlchemy's (wrapped, the connection
    invalidated if lost) like any statement's.
    """
    statement = f"SET LOCAL statement_timeout = {max(1, round(seconds * 1000))}"
    dialect = engine.dialect
    begin = dialect.do_begin

    def do_begin(dbapi_conn: Any) -> None:
        begin(dbapi_conn)
        counted()
        cursor = dbapi_conn.cursor()
        try:
            cursor.execute(statement)  # pg8000 opens the transaction first if none is
        finally:
            cursor.close()

    dialect.do_begin = do_begin  # type: ignore[method-assign,assignment]  # wrapped per engine, on purpose


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

    dialect.do_ping = do_ping  # type: ignore[assignment]  # wrapped per engine, on purpose


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
