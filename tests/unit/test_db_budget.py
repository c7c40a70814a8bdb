"""The connection budget and a database refusing for load, on real PostgreSQL and MariaDB.

Counts the server's own view of the connections (pg_stat_activity,
information_schema.processlist) of a database made for the test, and
makes the server refuse for real (an account allowed one connection).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from compute_agent import exception, green
from compute_agent.db import migration
from compute_agent.db.api import Database
from compute_agent.db.busy import BusyWaiter
from compute_agent.db.engine import Deadlines, is_busy
from compute_agent.rpc import BINARY
from compute_agent.service import NodeService
from tests.busy_role import BusyAccount
from tests.conftest import PGBOUNCER, SERVER_DB, SERVER_URLS, backend_params
from tests.helpers import create_instance

SERVERS = backend_params("postgresql", "mysql")
POOL_SIZE = 3
WORKERS = 8
HOLD_S = 0.5


class ServerCount:
    """How many connections the server has open to one database, as it reports them."""

    def __init__(self, backend: str, database: str) -> None:
        self.backend = backend
        self.database = database
        self.engine = sa.create_engine(SERVER_URLS[backend], isolation_level="AUTOCOMMIT")

    def __call__(self) -> int:
        if self.backend == "postgresql":
            query = "SELECT count(*) FROM pg_stat_activity WHERE datname = :db"
        else:
            query = "SELECT count(*) FROM information_schema.processlist WHERE db = :db"
        with self.engine.connect() as conn:
            return int(conn.execute(sa.text(query), {"db": self.database}).scalar_one())

    def close(self) -> None:
        self.engine.dispose()


@pytest.fixture(params=SERVERS)
def server_db(request, db_url_factory) -> Iterator[tuple[Database, ServerCount]]:
    """A migrated database of its own (its connections are only this test's), and its counter."""
    url = db_url_factory(request.param)
    database = Database(url, pool_size=POOL_SIZE)
    migration.upgrade(database)
    database.dispose()
    count = ServerCount(request.param, sa.make_url(url).database)
    yield database, count
    database.dispose()
    count.close()


def _sleep_sql(db: Database) -> sa.TextClause:
    """The server sleeps ``:seconds`` inside the statement, holding its connection."""
    if db.url.get_backend_name() == "postgresql":
        return sa.text("SELECT pg_sleep(:seconds)")
    return sa.text("SELECT SLEEP(:seconds)")


def test_idle_one_connection_peak_pool_size_extras_closed(server_db):
    db, count = server_db
    assert count() == 0
    for _ in range(5):  # an idle agent: a heartbeat now and then
        db.service_start("budget-host", BINARY, "owner-1")
    assert count() == 1

    peak = 0
    holding = [green.submit(_hold, db, name=f"hold-{i}") for i in range(WORKERS)]
    while not all(t.done() for t in holding):
        peak = max(peak, count())
        green.sleep(0.05)
    for t in holding:
        t.result(30)
    after = count()
    print(f"\n{db.url.get_backend_name()}: idle 1, peak {peak} of {WORKERS} callers, after {after}")
    # Eight callers at once: the pool lets pool_size through, the rest wait.
    assert peak == POOL_SIZE
    # Given back, the extra connections are closed; one stays for the next call.
    assert after == 1


def _hold(db: Database, seconds: float = HOLD_S) -> None:
    with db._begin() as conn:
        conn.execute(_sleep_sql(db), {"seconds": seconds})


def test_the_heartbeat_is_written_while_every_pooled_connection_is_busy(server_db, conf, caplog):
    """A sync's long transactions on a distant server (each row of an executemany is a
    round trip) held every pooled connection past the heartbeat's wait: it failed beat
    after beat and the host looked down while it worked."""
    db, count = server_db
    conf.set_override("report_interval", 2)  # the heartbeat waits 1.6 s
    svc = NodeService(conf, db)
    svc.claim()
    holding = [green.submit(_hold, db, 8.0, name=f"hold-{i}") for i in range(POOL_SIZE)]
    assert _eventually(lambda: db.engine.pool.checkedout() == POOL_SIZE)
    assert _eventually(lambda: count() == POOL_SIZE)
    t0 = green.monotonic()
    with caplog.at_level(logging.WARNING, logger="compute_agent.db.api"):
        assert svc.heartbeat() == 1
    took = green.monotonic() - t0
    # The heartbeat's own connection closed after its write (the server
    # drops a closed connection from its view a moment later).
    closed = _eventually(lambda: count() == POOL_SIZE, timeout=3.0)
    assert not any(t.done() for t in holding)  # the pool was full all along
    for t in holding:
        t.result(30)
    print(f"\n{db.url.get_backend_name()}: heartbeat beside a full pool in {took:.3f} s")
    assert took < 1.6, took
    assert db.side_connections == 1
    said = [r.getMessage() for r in caplog.records if r.name == "compute_agent.db.api"]
    assert said and said[0].startswith("all 3 pooled database connections busy"), said
    assert closed
    assert db.service_stopped(svc.row.id, svc.owner)  # the stop's write: the same way
    row = db.service_get(conf.host, BINARY)
    assert row is not None and row.report_count == 1 and row.stopped_at is not None


def test_batches_of_writes_leave_one_pooled_connection_free(server_db, conf, monkeypatch):
    """On a distant server each batch holds its connection for seconds: more batches
    than connections waited out the pool's 30 s and failed (1000 rows of a 3000-row
    sync, bench/distant_db.py). Batches now take turns: all connections but one."""
    db, _count = server_db
    svc = NodeService(conf, db)
    svc.claim()
    batches = [[create_instance(db) for _ in range(8)] for _ in range(POOL_SIZE + 1)]
    real = Database._pause
    monkeypatch.setattr(Database, "_pause", lambda self: (green.sleep(0.05), real(self)))
    writes = [
        [(i, {"power_state": "shutdown"}, {"updated_at": i.updated_at}, []) for i in batch]
        for batch in batches
    ]
    running = [
        green.submit(db.instance_compare_and_set_many, w, name=f"batch-{n}")
        for n, w in enumerate(writes)
    ]
    peak = 0
    beats = 0
    while not all(t.done() for t in running):
        peak = max(peak, db.engine.pool.checkedout())
        if beats == 0 and peak == POOL_SIZE - 1:
            beats = svc.heartbeat()  # on the connection left over, at once
        green.sleep(0.01)
    assert all(all(t.result(30)) for t in running)
    assert peak == POOL_SIZE - 1, peak
    assert beats == 1 and db.side_connections == 0


def _eventually(check, timeout: float = 10.0) -> bool:
    end = green.monotonic() + timeout
    while not check():
        if green.monotonic() > end:
            return False
        green.sleep(0.02)
    return True


@pytest.fixture(params=SERVERS)
def busy(request, db_url_factory) -> Iterator[tuple[BusyAccount, Database]]:
    """A migrated database, an account allowed one connection to it, and a Database as it."""
    url = db_url_factory(request.param)
    owner = Database(url)
    migration.upgrade(owner)
    owner.dispose()
    account = BusyAccount(url)
    # A connect deadline long enough for a loaded machine: the wait for a
    # second connection is bounded by it.
    database = Database(account.url, deadlines=Deadlines(connect=20.0))
    yield account, database
    database.dispose()
    account.drop()


def test_a_server_refusing_for_load_is_database_busy(busy):
    account, db = busy
    account.hold()
    with pytest.raises(exception.DatabaseBusy) as refused:
        db.service_get("h", BINARY)
    cause = refused.value.__cause__
    assert isinstance(cause, sa.exc.DBAPIError) and is_busy(cause.orig)
    text = str(refused.value)
    assert "53300" in text or "1226" in text, text
    account.release()
    # The same Database, once the server has seen the connection go (not
    # at once: the server's backend ends a moment after the client closes).
    assert BusyWaiter(10.0).call("after release", lambda: db.service_get("h", BINARY)) is None


def test_a_second_connection_refused_for_load_waits_for_the_first(busy):
    """The server has room for one: two tasks at once both succeed, one after the other."""
    account, db = busy
    first = green.submit(_hold, db, name="first")
    deadline = green.monotonic() + 30
    while db.engine.pool.checkedout() == 0 and green.monotonic() < deadline:  # type: ignore[attr-defined]
        green.sleep(0.01)
    green.sleep(0.1)  # the first holds the account's only connection
    second = green.submit(db.service_get, "h", BINARY, name="second")
    assert second.result(30) is None
    first.result(30)
    assert db.busy_waits >= 1  # it was refused, waited, and had the first's connection


def test_an_outage_that_is_not_load_is_not_busy():
    db = Database("postgresql+pg8000://postgres@127.0.0.1:1/nowhere")  # nothing listens on 1
    with pytest.raises(exception.DatabaseUnavailable) as refused:
        db.service_get("h", BINARY)
    assert not isinstance(refused.value, exception.DatabaseBusy)
    waiter = BusyWaiter(30.0)
    with pytest.raises(exception.DatabaseUnavailable):
        waiter.call("probe", lambda: db.service_get("h", BINARY))
    assert waiter.retries == 0  # failed at once: a wait would not cure it


def test_the_waiter_retries_until_the_server_has_room(busy, caplog):
    account, db = busy
    account.hold()
    green.call_later(1.5, account.release, name="release")
    waiter = BusyWaiter(30.0, first_pause=0.2, max_pause=0.5)
    with caplog.at_level(logging.WARNING, logger="compute_agent.db.busy"):
        row = waiter.call("claiming", lambda: db.service_start("h", BINARY, "owner-1"))
    assert row.host == "h"
    # Only the waiter's own lines: under threads another test's thread (a
    # transport reconnecting to a broker it stopped) may log meanwhile.
    lines = [r.getMessage() for r in caplog.records if r.name == "compute_agent.db.busy"]
    # One line per pause, each naming the refusal; a few pauses in 1.5 s.
    assert len(lines) == waiter.retries >= 2, lines
    assert all(line.startswith("claiming: database unavailable: ") for line in lines), lines


def test_the_waiter_gives_up_at_its_deadline(busy):
    account, db = busy
    account.hold()
    waiter = BusyWaiter(1.0, first_pause=0.2, max_pause=0.3)
    t0 = green.monotonic()
    with pytest.raises(exception.DatabaseBusy, match="still refused after"):
        waiter.call("claiming", lambda: db.service_get("h", BINARY))
    assert green.monotonic() - t0 < 10  # bounded by its budget, not by the refusal
    assert waiter.retries >= 2


def test_a_heartbeat_refused_for_load_is_retried_before_the_next(busy, conf, caplog):
    """The pool's connection lost, the server full: the heartbeat waits for room, on time."""
    account, db = busy
    conf.set_override("report_interval", 5)
    svc = NodeService(conf, db)
    svc.claim()
    db.engine.dispose()  # the next heartbeat needs a new connection
    account.hold()
    green.call_later(1.0, account.release, name="release")
    with caplog.at_level(logging.WARNING, logger="compute_agent.db.busy"):
        assert svc.heartbeat() == 1  # not a failure: written within the interval's share
    assert any(
        r.getMessage().startswith("heartbeat: ")
        for r in caplog.records
        if r.name == "compute_agent.db.busy"
    )
    row = db.service_get(conf.host, BINARY)
    assert row is not None and row.report_count == 1


@SERVER_DB
def test_pgbouncer_client_connections_share_few_server_ones(db_url_factory):
    """Through the pooler, eight agents idle hold no server connection between transactions."""
    url = db_url_factory(PGBOUNCER)
    name = sa.make_url(url).database
    count = ServerCount("postgresql", name)
    agents = [Database(url, transaction_pooling=True) for _ in range(WORKERS)]
    try:
        migration.upgrade(agents[0])
        for i, agent in enumerate(agents):
            agent.service_start(f"pooled-{i}", BINARY, "owner")
        held = [agent.engine.pool.checkedin() for agent in agents]  # type: ignore[attr-defined]
        green.sleep(0.2)
        server = count()
        print(f"\npgbouncer: {WORKERS} agents keep {sum(held)} client connections, server {server}")
        assert held == [1] * WORKERS
        # PgBouncer gave the server connections back to its pool after each
        # transaction; one server connection served them all, one at a time.
        assert server <= 2, server
    finally:
        for agent in agents:
            agent.dispose()
        count.close()


@SERVER_DB
def test_pgbouncer_statement_deadline_holds_per_transaction_and_leaks_nowhere(db_url_factory):
    """SET LOCAL: the deadline in every transaction of the agent, none left for the next client."""
    url = db_url_factory(PGBOUNCER)
    agent = Database(url, deadlines=Deadlines(statement=7.0), transaction_pooling=True)
    plain = sa.create_engine(url, poolclass=sa.pool.NullPool)  # no deadline of its own
    try:
        for _ in range(3):
            with agent._begin() as conn:
                assert conn.execute(sa.text("SHOW statement_timeout")).scalar_one() == "7s"
                # Parameters: pg8000's unnamed prepared statement, parse to execute in
                # one transaction, hence on one server connection.
                assert (
                    conn.execute(
                        sa.text("SELECT CAST(:a AS int) + CAST(:b AS int)"), {"a": 1, "b": 2}
                    ).scalar_one()
                    == 3
                )
            with plain.connect() as other:
                assert other.execute(sa.text("SHOW statement_timeout")).scalar_one() == "0"
    finally:
        agent.dispose()
        plain.dispose()


@SERVER_DB
def test_pgbouncer_without_transaction_pooling_says_what_to_set(db_url_factory):
    db = Database(db_url_factory(PGBOUNCER))
    try:
        with pytest.raises(exception.DatabaseUnavailable, match="transaction_pooling = true"):
            db.service_get("h", BINARY)
    finally:
        db.dispose()


@pytest.mark.parametrize(
    ("error", "busy"),
    [
        ({"C": "53300", "M": "sorry, too many clients already"}, True),
        ({"C": "57P03", "M": "the database system is starting up"}, True),
        ({"C": "08P01", "M": "no more connections allowed (max_client_conn)"}, True),
        ({"C": "08P01", "M": "query_wait_timeout"}, True),
        ({"C": "08P01", "M": "unsupported startup parameter: statement_timeout"}, False),
        ({"C": "28000", "M": 'role "x" does not exist'}, False),
        ((1040, "Too many connections"), True),
        ((1045, "Access denied for user"), False),
        (("network error",), False),
    ],
)
def test_which_refusals_are_for_load(error, busy):
    """PgBouncer's refusals cannot be made on demand here: its texts, as it sends them."""
    driver_error = Exception(*(error if isinstance(error, tuple) else (error,)))
    assert is_busy(driver_error) is busy


def test_the_waiter_backs_off_with_jitter_within_its_budget():
    now = [0.0]
    pauses: list[float] = []

    def sleep(seconds: float) -> None:
        pauses.append(seconds)
        now[0] += seconds

    def refused() -> None:
        raise exception.DatabaseBusy("database unavailable: too many clients")

    waiter = BusyWaiter(
        20.0, first_pause=0.5, max_pause=4.0, clock=lambda: now[0], sleep=sleep, jitter=lambda: 1.0
    )
    with pytest.raises(exception.DatabaseBusy):
        waiter.call("probe", refused)
    # Doubling from 0.5 s, capped at 4 s, each 1.5x at the top of the jitter,
    # stopping before a pause would end past the budget.
    assert pauses == [0.75, 1.5, 3.0, 6.0, 6.0]
    assert sum(pauses) <= 20.0
