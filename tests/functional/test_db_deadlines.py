"""A database that stops answering: every wait on it ends at its deadline.

A TCP proxy in front of the real server is frozen (connections stay open,
nothing is forwarded, new ones are accepted and never answered), or the
configured port accepts and never answers. Without deadlines the
heartbeat, ``status``, ``instances list``, ``db version`` and the agent's
start all hung, silently (issue 11).
"""

from __future__ import annotations

import datetime as dt
import json
import socket
import time
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from compute_agent import exception, green
from compute_agent import service as service_module
from compute_agent.db import migration
from compute_agent.db.api import Database
from compute_agent.db.engine import Deadlines
from compute_agent.service import NodeService
from tests.functional.agent_process import REPO, AgentProcess, manage_all
from tests.functional.frozen_proxy import FrozenProxy
from tests.helpers import eventually

CONNECT_TIMEOUT = 1.0
STATEMENT_TIMEOUT = 2.0
DEADLINES = Deadlines(connect=CONNECT_TIMEOUT, statement=STATEMENT_TIMEOUT)
# A silent pooled connection fails after the statement deadline, its
# replacement after the connect deadline; the rest is a loaded machine's
# slack (a CLI process alone takes 1-3 s to start).
FIRST_FAILURE_BOUND = STATEMENT_TIMEOUT + CONNECT_TIMEOUT + 12
HEARTBEAT_FAILED = "periodic task heartbeat failed"


def _via(url: str, port: int) -> str:
    return sa.make_url(url).set(host="127.0.0.1", port=port).render_as_string(hide_password=False)


def _config(where, url: str) -> list:
    where.mkdir(exist_ok=True)
    path = where / "deadlines.conf"
    path.write_text(
        f"[DEFAULT]\nstate_path = {where}/state\nhost = deadline-host\n"
        "report_interval = 1\nperiodic_fuzzy_delay = 0\n"
        f"[database]\nconnection = {url}\nconnect_timeout = {CONNECT_TIMEOUT}\n"
        f"statement_timeout = {STATEMENT_TIMEOUT}\n"
    )
    return [REPO / "etc" / "compute-agent.conf", path]


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port whose kernel completes every TCP handshake; nobody ever answers."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    yield sock.getsockname()[1]
    sock.close()


@pytest.mark.parametrize("backend", ["postgresql", "mysql"])
def test_a_frozen_server_is_a_typed_error_within_the_deadline(backend, db_url_factory):
    """In-process, green: the socket deadlines fire under eventlet, hub free meanwhile."""
    url = sa.make_url(db_url_factory(backend))
    with FrozenProxy(url.host, url.port) as proxy:
        database = Database(_via(url.render_as_string(False), proxy.port), deadlines=DEADLINES)
        ticks = []
        ticker = green.spawn(_tick, ticks, name="ticker")
        try:
            migration.upgrade(database)  # through the proxy: it forwards while thawed
            assert database.service_get_all() == []  # connected, pooled
            proxy.freeze()
            took = []
            for _ in range(2):  # the pooled connection's pre-ping, then a fresh one
                t0 = time.monotonic()
                with pytest.raises(exception.DatabaseUnavailable, match="timed out"):
                    database.service_get_all()
                took.append(round(time.monotonic() - t0, 2))
            proxy.thaw()
            assert database.service_get_all() == []
            # Frozen in the middle of a transaction: the statement's own wait
            # ends, and the connection it leaves is never used again.
            t0 = time.monotonic()
            with pytest.raises(exception.DatabaseUnavailable, match="timed out"):
                with database.transaction() as s:
                    s.execute(sa.text("SELECT 1"))
                    proxy.freeze()
                    s.execute(sa.text("SELECT 2"))
            took.append(round(time.monotonic() - t0, 2))
            proxy.thaw()
            assert database.service_get_all() == []
            assert max(took) < STATEMENT_TIMEOUT + CONNECT_TIMEOUT + 5, took
        finally:
            green.kill(ticker)
            database.dispose()
    # The waits were green: the hub kept waking a 50 ms ticker all along.
    gaps = [b - a for a, b in zip(ticks, ticks[1:], strict=False)]
    print(f"\n{backend}: DatabaseUnavailable after {took} s; longest ticker gap {max(gaps):.3f} s")
    assert len(ticks) > 20 and max(gaps) < 1.0, max(gaps)


@pytest.mark.parametrize("backend", ["postgresql", "mysql"])
def test_the_pools_check_of_a_silent_server_waits_the_connect_deadline(backend, db_url_factory):
    """Not the statement deadline: a heartbeat must not wait 30 s to learn the server is gone."""
    url = sa.make_url(db_url_factory(backend))
    long_statements = Deadlines(connect=CONNECT_TIMEOUT, statement=60.0)
    with FrozenProxy(url.host, url.port) as proxy:
        through = _via(url.render_as_string(False), proxy.port)
        database = Database(through, deadlines=long_statements)
        try:
            migration.upgrade(database)
            assert database.service_get_all() == []  # a pooled connection
            proxy.freeze()
            t0 = time.monotonic()
            with pytest.raises(exception.DatabaseUnavailable):
                database.service_get_all()  # pre-ping (1 s), then a fresh connection (1 s)
            took = time.monotonic() - t0
            proxy.thaw()
            assert database.service_get_all() == []
        finally:
            database.dispose()
    print(f"\n{backend}: a silent server found out in {took:.2f} s with 60 s statements")
    assert took < 2 * CONNECT_TIMEOUT + 8, took  # measured 1.0-2.1 s; 60 s before


def _tick(ticks: list[float]) -> None:
    while True:
        ticks.append(time.monotonic())
        green.sleep(0.05)


def test_agent_on_a_frozen_postgresql_reports_and_recovers(tmp_path, db_url_factory):
    url = db_url_factory("postgresql")
    direct = Database(url)
    migration.upgrade(direct)
    direct.dispose()
    parsed = sa.make_url(url)
    with FrozenProxy(parsed.host, parsed.port) as proxy:
        config = _config(tmp_path, _via(url, proxy.port))
        agent = AgentProcess(config)
        try:
            agent.wait_for("heartbeat 2")
            proxy.freeze()
            frozen_at, frozen_wall = time.monotonic(), time.time()
            status, listing = manage_all(
                [["status", "-f", "json"], ["instances", "list"]], config, timeout=60
            )
            answered = time.monotonic() - frozen_at
            # status answers, with the reason; instances list fails typed; no hang.
            assert status.returncode == 0, status.stderr
            host_state = json.loads(status.stdout)["host_state"]
            assert host_state["error"].startswith("database unavailable: "), host_state
            assert listing.returncode == 1
            assert listing.stderr.startswith(
                "compute-agent-manage: error: DatabaseUnavailable: database unavailable: "
            ), listing.stderr
            assert len(listing.stderr.splitlines()) == 1
            assert answered < FIRST_FAILURE_BOUND, answered

            # The heartbeat fails once per try, each a line of its own, counted.
            eventually(
                lambda: _count(agent, HEARTBEAT_FAILED) >= 3,
                FIRST_FAILURE_BOUND + 10,
                "three heartbeat failures logged",
                detail=lambda: agent.output[-2000:],
            )
            (status,) = manage_all([["status", "-f", "json"]], config, timeout=60)
            (heartbeat,) = [
                t for t in json.loads(status.stdout)["periodic_tasks"] if t["name"] == "heartbeat"
            ]
            assert heartbeat["failures"] >= 3
            assert heartbeat["last_error"].startswith("DatabaseUnavailable: database unavailable")

            proxy.thaw()
            agent.wait_for("periodic task heartbeat recovered after", timeout=30)
            done = _count(agent, "heartbeat ")
            eventually(
                lambda: _count(agent, "heartbeat ") > done + 1, 15, "heartbeats after the thaw"
            )
            rc, _ = agent.terminate()
        finally:
            agent.kill()
    assert rc == 0, agent.output
    failures = [line for line in agent.lines if HEARTBEAT_FAILED in line]
    assert all("DatabaseUnavailable: database unavailable" in line for line in failures)
    assert "Traceback" not in agent.output
    # A failure line per try: the first after one statement and one connect
    # deadline, the next ones a connect deadline after each heartbeat start.
    times = [frozen_wall] + [_logged_at(line) for line in failures]
    gaps = [round(b - a, 2) for a, b in zip(times, times[1:], strict=False)]
    print(
        f"\nstatus and instances list answered {answered:.2f} s after the freeze; "
        f"heartbeat failures {len(failures)}, logged at gaps of {gaps} s"
    )
    assert max(gaps) < STATEMENT_TIMEOUT + CONNECT_TIMEOUT + 5, gaps


def _logged_at(line: str) -> float:
    """The wall time of an agent log line (its asctime, local time)."""
    return dt.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()


def _count(agent: AgentProcess, needle: str) -> int:
    return sum(needle in line for line in list(agent.lines))


def test_db_commands_and_start_on_a_silent_port_fail_with_one_line(tmp_path, silent_port):
    pg = _config(tmp_path / "pg", f"postgresql://postgres@127.0.0.1:{silent_port}/none")
    my = _config(tmp_path / "my", f"mysql://root@127.0.0.1:{silent_port}/none")
    agent = AgentProcess(pg)
    try:
        results, batches = [], []
        for config, commands in (
            (pg, [["db", "version"], ["db", "sync"]]),
            (my, [["db", "version"]]),
        ):
            t0 = time.monotonic()
            results += manage_all(commands, config, timeout=60)
            batches.append(time.monotonic() - t0)
        rc = agent.wait_exit(timeout=60)
    finally:
        agent.kill()
    for done in results:
        assert done.returncode == 1, done
        assert done.stdout == ""
        (line,) = done.stderr.splitlines()
        assert line.startswith("compute-agent-manage: error: database unavailable: "), line
        assert "timed out" in line, line
    assert rc == 1, agent.output
    (line,) = agent.lines
    assert line.startswith("compute-agent: error: cannot use database "), line
    assert "database unavailable: " in line and "timed out" in line, line
    # One connect deadline each, not for ever: the rest is start-up on a
    # loaded machine (2.9 s for `db version` alone at load average 6).
    batches = [round(b, 2) for b in batches]
    print(f"\nsilent port: CLI batches (pg 2 commands, mysql 1) exited after {batches} s")
    assert max(batches) < CONNECT_TIMEOUT + 20, batches


def _lock_row(url: str, row_id: int) -> tuple[sa.Engine, sa.Connection]:
    """Another client holds the services row ``row_id`` (SELECT ... FOR UPDATE, uncommitted)."""
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    conn = engine.connect()
    conn.execute(sa.text("SELECT id FROM services WHERE id = :id FOR UPDATE"), {"id": row_id})
    return engine, conn


@pytest.mark.parametrize("backend", ["postgresql", "mysql"])
def test_a_statement_ended_at_its_deadline_is_a_typed_error_in_one_line(backend, db_url_factory):
    """A lock held elsewhere: the server ends the statement (PostgreSQL 57014), or the
    socket's deadline does (MariaDB). Before, PostgreSQL's error went up raw: an
    87-line traceback from the claim at start, a 4-line log line with the SQL."""
    url = db_url_factory(backend)
    database = Database(url, deadlines=DEADLINES)
    migration.upgrade(database)
    row = database.service_start("locked-host", "compute-agent", "owner-1")
    engine, holder = _lock_row(url, row.id)
    try:
        t0 = time.monotonic()
        with pytest.raises(exception.DatabaseUnavailable) as caught:
            database.service_heartbeat(row.id, "owner-1")
        took = time.monotonic() - t0
    finally:
        holder.close()
        engine.dispose()
        database.dispose()
    message = str(caught.value)
    print(f"\n{backend}: {message!r} after {took:.2f} s")
    assert "\n" not in message and "SELECT" not in message and "UPDATE" not in message
    assert took < STATEMENT_TIMEOUT + CONNECT_TIMEOUT + 5, took


def test_a_stop_whose_row_is_locked_waits_for_its_write_only_so_long(conf, db_url_factory, caplog):
    """The row locked elsewhere held the stop for the whole statement deadline (30 s by
    default; with 90 s, systemd's TimeoutStopSec=60 killed the agent)."""
    url = db_url_factory("postgresql")
    database = Database(url)  # the default deadlines: statement 30 s
    migration.upgrade(database)
    conf.set_override("report_interval", 60)
    svc = NodeService(conf, database)
    svc.claim()
    assert svc.row is not None
    engine, holder = _lock_row(url, svc.row.id)
    try:
        t0 = time.monotonic()
        svc.stop()
        took = time.monotonic() - t0
    finally:
        holder.close()
        engine.dispose()
    print(f"\nstop with the row locked: {took:.2f} s")
    assert took < service_module.STOP_WRITE_WAIT + 5, took
    assert "could not mark the service stopped: no answer within 5 s" in caplog.text


_LOCK_WAITERS = {
    "postgresql": "SELECT count(*) FROM pg_stat_activity "
    "WHERE wait_event_type = 'Lock' AND datname = current_database()",
    # Any statement of this database waiting a second or more (InnoDB's
    # LOCK WAIT state in innodb_trx was once not seen in 30 s of the wait).
    "mysql": "SELECT count(*) FROM information_schema.processlist WHERE db = DATABASE() "
    "AND command = 'Query' AND time >= 1 AND id <> CONNECTION_ID()",
}


@pytest.mark.parametrize("backend", ["postgresql", "mysql"])
def test_sigterm_while_the_claim_meets_its_row_locked_stops_at_once(
    backend, db_url_factory, tmp_path
):
    """The claim at start waited out the statement deadline (30 s by default) under a
    SIGTERM, then exited 1 with "cannot claim the service row"; a requested stop now
    ends the start at once, exit 0, and the row keeps what it had."""
    url = db_url_factory(backend)
    database = Database(url)
    migration.upgrade(database)
    row = database.service_start("claim-locked", "compute-agent", "earlier-agent")
    assert database.service_stopped(row.id, "earlier-agent")
    config = tmp_path / "claim.conf"
    config.write_text(
        f"[DEFAULT]\nstate_path = {tmp_path}/state\nhost = claim-locked\n"
        f"[database]\nconnection = {url}\n"  # the default deadlines: statement 30 s
    )
    engine, holder = _lock_row(url, row.id)
    agent = AgentProcess([REPO / "etc" / "compute-agent.conf", config])
    try:

        def waiters() -> int:  # a connection each time: PostgreSQL's view is per transaction
            with engine.connect() as watcher:
                return int(watcher.execute(sa.text(_LOCK_WAITERS[backend])).scalar() or 0)

        eventually(
            waiters, 60, "the agent's claim queued behind the lock", detail=lambda: agent.output
        )
        rc, took = agent.terminate(timeout=60)
    finally:
        agent.kill()
        holder.close()
        engine.dispose()
    after = database.service_get("claim-locked", "compute-agent")
    database.dispose()
    print(f"\n{backend}: SIGTERM during a claim on a locked row: exit {rc} after {took:.2f} s")
    assert rc == 0, agent.output[-3000:]
    assert "stop requested while claiming the service row: the start is given up" in agent.output
    assert "cannot claim" not in agent.output
    assert took < 8, took
    assert after is not None and after.owner == "earlier-agent" and after.stopped_at is not None
