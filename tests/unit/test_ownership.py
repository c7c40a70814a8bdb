"""One owner per host: the state directory lock and the service row's owner token."""

import contextlib
import datetime as dt
import os

import pytest
import sqlalchemy as sa

from compute_agent import exception, green
from compute_agent.db.api import Database
from compute_agent.db.models import Service
from compute_agent.exception import OwnedElsewhere
from compute_agent.ownership import LOCK_NAME, HostLock, new_token
from compute_agent.service import BINARY, EXIT_DISPLACED, NodeService
from compute_agent.utils import utcnow

DOWN = 60


# -- the lock on state_path ------------------------------------------------


def test_a_second_lock_on_the_state_path_is_refused_naming_the_holder(tmp_path):
    first = HostLock(str(tmp_path))
    assert first.acquire().token is None  # a fresh file: no predecessor
    first.record("a" * 32)
    second = HostLock(str(tmp_path))
    with pytest.raises(OwnedElsewhere, match=f"pid {os.getpid()}.*{LOCK_NAME}"):
        second.acquire()
    assert not second.held
    first.release()
    # Released (as the kernel does when the holder dies): the next one
    # takes it and learns the token of the one before.
    assert second.acquire().token == "a" * 32
    second.release()


def test_a_restart_after_restarts_that_died_before_their_claim_takes_the_row(tmp_path, db):
    """Agent A killed; restarts die before claiming (database down); the next one.

    The lock file named only the last restart's token: the row, held by A
    with a fresh heartbeat, was refused to the next restart until A's
    heartbeat aged past service_down_time ("stop it first": nothing ran).
    """
    state = str(tmp_path)
    a = HostLock(state)
    a.acquire()
    token_a = new_token()
    a.record(token_a)
    svc = db.service_start("h1", BINARY, token_a, down_time=DOWN)
    db.service_heartbeat(svc.id, token_a)
    a.release()  # killed: the kernel drops the lock
    for _ in range(3):  # each takes the lock, records itself, dies before its claim
        lock = HostLock(state)
        inherited = lock.acquire().tokens
        lock.record(new_token(), inherited)
        lock.release()
    lock = HostLock(state)
    inherited = lock.acquire().tokens
    assert token_a in inherited and len(inherited) == 4
    token = new_token()
    lock.record(token, inherited)
    svc = db.service_start("h1", BINARY, token, down_time=DOWN, predecessor=inherited)
    assert svc.owner == token
    lock.record(token)  # claimed: the file names this agent only
    lock.release()
    assert HostLock(state).acquire().tokens == (token,)


def test_the_lock_file_is_private(tmp_path):
    lock = HostLock(str(tmp_path))
    lock.acquire()
    try:
        assert os.stat(lock.path).st_mode & 0o777 == 0o600
    finally:
        lock.release()


# -- the owner token on the service row --------------------------------------


def _row(db) -> Service:
    return db.service_get("h1", BINARY)


def _set(db, **values) -> None:
    with db.engine.begin() as conn:
        conn.execute(sa.update(Service).where(Service.host == "h1").values(**values))


def test_a_live_owner_refuses_a_second_claim_and_nothing_is_written(db):
    first = new_token()
    db.service_start("h1", BINARY, first, down_time=DOWN)
    db.service_heartbeat(_row(db).id, first)
    before = _row(db)
    statements = db.statements
    with pytest.raises(exception.ServiceOwned, match=r"held by another compute-agent .*ago"):
        db.service_start("h1", BINARY, new_token(), down_time=DOWN)
    after = _row(db)
    assert db.statements > statements  # it did ask
    assert (after.owner, after.updated_at, after.started_at, after.report_count) == (
        before.owner,
        before.updated_at,
        before.started_at,
        before.report_count,
    )


@pytest.mark.parametrize("row", ["none yet", "stopped"])
def test_two_claims_at_the_same_instant_one_wins(db, row):
    """Two agents (own state_paths, one database) started together: exactly one owns the host."""
    url = db.url.render_as_string(hide_password=False)
    for i in range(5):
        host = f"race-{i}"
        if row == "stopped":
            token = new_token()
            db.service_stopped(db.service_start(host, BINARY, token).id, token)
        pooled = db.transaction_pooling
        engines = [Database(url, transaction_pooling=pooled) for _ in range(2)]
        won: list[str] = []

        def claim(database, won=won, host=host):
            with contextlib.suppress(exception.ServiceOwned):
                won.append(database.service_start(host, BINARY, new_token(), down_time=DOWN).owner)

        for thread in [green.spawn(claim, e) for e in engines]:
            thread.wait()
        for e in engines:
            e.dispose()
        assert len(won) == 1 and db.service_get(host, BINARY).owner == won[0], (i, won)


@pytest.mark.parametrize(
    "why",
    ["stopped", "stale", "no owner", "predecessor"],
)
def test_a_row_its_owner_left_is_claimed_at_once(db, why):
    first, second = new_token(), new_token()
    db.service_start("h1", BINARY, first, down_time=DOWN)
    if why == "stopped":
        db.service_stopped(_row(db).id, first)
    elif why == "stale":
        _set(db, updated_at=utcnow() - dt.timedelta(seconds=DOWN + 5))
    elif why == "no owner":
        _set(db, owner=None)  # a row written before revision 0002
    predecessor = first if why == "predecessor" else None
    svc = db.service_start("h1", BINARY, second, down_time=DOWN, predecessor=predecessor)
    row = _row(db)
    assert row.owner == svc.owner == second and row.stopped_at is None


def test_a_displaced_owner_can_neither_heartbeat_nor_mark_the_row_stopped(db):
    first, second = new_token(), new_token()
    row_id = db.service_start("h1", BINARY, first, down_time=DOWN).id
    db.service_stopped(row_id, first)
    db.service_start("h1", BINARY, second, down_time=DOWN)
    with pytest.raises(exception.OwnershipLost, match="held by another"):
        db.service_heartbeat(row_id, first)
    assert db.service_stopped(row_id, first) is False
    assert _row(db).stopped_at is None and _row(db).owner == second
    db.service_heartbeat(row_id, second)
    assert _row(db).report_count == 1


def test_a_service_losing_its_row_stops_writing_and_exits_displaced(conf, sqlite_db, caplog):
    conf.set_override("report_interval", 1)
    svc = NodeService(conf, sqlite_db)
    svc.claim()  # the heartbeats are called here, not by the periodic runner
    try:
        svc.heartbeat()
        thief = new_token()
        with sqlite_db.engine.begin() as conn:
            conn.execute(sa.update(Service).values(owner=thief))
        svc.heartbeat()
        assert svc.displaced and svc.exit_status == EXIT_DISPLACED and svc.stopping
        assert svc.heartbeat() == svc.row.report_count  # no second error, no write
        errors = [
            r
            for r in caplog.records
            if r.levelname == "ERROR" and r.name.startswith("compute_agent")
        ]
        assert len(errors) == 1 and "ownership of host test-host lost" in errors[0].getMessage()
    finally:
        svc.stop()
    row = sqlite_db.service_get("test-host", BINARY)
    assert row.owner == thief and row.stopped_at is None  # the stop wrote nothing


def test_status_line_says_what_the_service_does(conf, sqlite_db):
    svc = NodeService(conf, sqlite_db)
    assert svc.status() == "host test-host: starting"
    svc.start()
    try:
        green.sleep(0)
        assert svc.status().startswith("host test-host: heartbeat ")
    finally:
        svc.stop()
    assert svc.status() == "host test-host: stopping"
