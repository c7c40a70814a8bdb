"""[database] deadlines: options, what each driver is given, and that it took them."""

import contextlib

import pytest
import sqlalchemy as sa

from compute_agent import exception
from compute_agent.db.api import Database
from compute_agent.db.engine import Deadlines, connect_args, unreachable_as_typed
from tests.conftest import SERVER_DB

DEADLINES = Deadlines(connect=1.5, statement=7.0, sqlite_busy=3.0)


def test_options_and_their_defaults(conf):
    assert Deadlines.from_conf(conf.database) == Deadlines(5.0, 30.0, 5.0) == Deadlines()
    conf.set_override("connect_timeout", 1.5, group="database")
    conf.set_override("statement_timeout", 7, group="database")
    conf.set_override("sqlite_busy_timeout", 3, group="database")
    assert Deadlines.from_conf(conf.database) == DEADLINES
    with pytest.raises(ValueError):
        conf.set_override("statement_timeout", 0, group="database")


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("sqlite:///x.sqlite", {"check_same_thread": False, "timeout": 3.0}),
        (
            "postgresql+pg8000://u@h/d",
            {"timeout": 1.5, "startup_params": {"statement_timeout": "7000"}},
        ),
        (
            "mysql+pymysql://u@h/d",
            {"connect_timeout": 1.5, "read_timeout": 1.5, "write_timeout": 1.5},
        ),
        ("postgresql+psycopg2://u@h/d", {}),  # not ours to guess: the URL's query says
    ],
)
def test_connect_args_per_driver(url, expected):
    assert connect_args(sa.make_url(url), DEADLINES) == expected


@contextlib.contextmanager
def _raw(database: Database):
    """The driver's own connection, as the pool hands it out."""
    fairy = database.engine.raw_connection()
    try:
        yield fairy.dbapi_connection
    finally:
        fairy.close()


@SERVER_DB
def test_postgresql_connection_carries_both_deadlines(db_url_factory):
    database = Database(db_url_factory("postgresql"), deadlines=DEADLINES)
    try:
        with _raw(database) as raw:
            # pg8000 connected with the connect deadline; reads now wait a statement's.
            assert raw._usock.gettimeout() == 7.0
        with database.transaction() as s:
            assert s.execute(sa.text("SHOW statement_timeout")).scalar() == "7s"
    finally:
        database.dispose()


@SERVER_DB
def test_mysql_connection_carries_the_statement_deadline(db_url_factory):
    database = Database(db_url_factory("mysql"), deadlines=DEADLINES)
    try:
        with _raw(database) as raw:
            assert raw.connect_timeout == 1.5
            assert raw._read_timeout == raw._write_timeout == 7.0
        with database.transaction() as s:
            assert s.execute(sa.text("SELECT 1")).scalar() == 1
    finally:
        database.dispose()


def test_sqlite_busy_timeout(tmp_path):
    database = Database(f"sqlite:///{tmp_path}/a.sqlite", deadlines=DEADLINES)
    try:
        with database.transaction() as s:
            assert s.execute(sa.text("PRAGMA busy_timeout")).scalar() == 3000
    finally:
        database.dispose()


@pytest.mark.parametrize(
    "error",
    [
        TimeoutError("timed out"),  # pg8000's SSL probe lets this through bare
        ConnectionResetError(104, "Connection reset by peer"),
        sa.exc.TimeoutError("QueuePool limit of size 5 overflow 5 reached"),
    ],
)
def test_socket_and_pool_timeouts_are_typed(error):
    with pytest.raises(exception.DatabaseUnavailable) as raised, unreachable_as_typed():
        raise error
    assert str(raised.value).startswith("database unavailable: ")
    assert "\n" not in str(raised.value)


def test_a_wrapped_timeout_is_named():
    """pg8000 says 'network error'; the message says it was a timeout."""
    orig = Exception("network error")
    orig.__cause__ = TimeoutError("timed out")
    wrapped = sa.exc.OperationalError("SELECT 1", {}, orig, connection_invalidated=True)
    with pytest.raises(exception.DatabaseUnavailable) as raised, unreachable_as_typed():
        raise wrapped
    assert str(raised.value) == (
        "database unavailable: Exception: network error (TimeoutError: timed out)"
    )
