"""One owner per host, with real agent processes on ``test:///default`` and SQLite.

A second agent for a live host must stop with one line and write nothing:
the database is dumped before and after it and compared.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import time

import pytest

from compute_agent.db.api import Database
from compute_agent.service import BINARY, EXIT_DISPLACED
from tests.functional.agent_process import REPO, AgentProcess, manage
from tests.helpers import create_instance

HOST = "owner-host"
# The running domain of libvirt's test driver: the instance below matches
# it, so the first agent's own syncs change nothing in the dumps.
TEST_DOMAIN_UUID = "6695eb01-f6a4-8304-79aa-97f2502e193f"


def _conf(path, state, host: str = HOST, db_path=None):
    db_line = f"[database]\nconnection = sqlite:///{db_path}\n" if db_path else ""
    path.write_text(
        f"[DEFAULT]\nstate_path = {state}\nhost = {host}\nreport_interval = 1\n"
        f"periodic_fuzzy_delay = 0\nservice_down_time = 60\n{db_line}"
    )
    return [REPO / "etc" / "compute-agent.conf", path]


@pytest.fixture
def first(tmp_path):
    """A running agent on ``tmp_path/a`` with one instance, settled."""
    config = _conf(tmp_path / "a.conf", tmp_path / "a")
    assert manage("db", "sync", config_files=config).returncode == 0
    db = Database(f"sqlite:///{tmp_path}/a/compute-agent.sqlite")
    create_instance(db, host=HOST, uuid=TEST_DOMAIN_UUID, name="test")
    db.dispose()
    agent = AgentProcess(config)
    try:
        agent.wait_for("power sync of 1 instances")
        agent.wait_for("heartbeat 2")
        yield agent
    finally:
        agent.kill()


def _db_file(tmp_path):
    return tmp_path / "a" / "compute-agent.sqlite"


def _dump(path) -> dict:
    """Every row that a second agent could write, heartbeat columns aside."""
    with sqlite3.connect(path) as conn:
        return {
            "services": conn.execute(
                "SELECT id, host, binary, created_at, started_at, stopped_at, owner, disabled "
                "FROM services ORDER BY id"
            ).fetchall(),
            "instances": conn.execute("SELECT * FROM instances ORDER BY id").fetchall(),
            "actions": conn.execute("SELECT * FROM instance_actions ORDER BY id").fetchall(),
        }


def _report_count(path) -> int:
    with sqlite3.connect(path) as conn:
        return conn.execute("SELECT report_count FROM services").fetchone()[0]


def _refused(agent: AgentProcess) -> str:
    rc = agent.proc.wait(60)
    agent._reader.join(2)
    assert rc == 1, agent.output
    assert len(agent.lines) == 1, agent.output  # one line, no log of a start
    return agent.lines[0]


def _still_heartbeating(path) -> None:
    count = _report_count(path)
    end = time.monotonic() + 20
    while _report_count(path) <= count:
        assert time.monotonic() < end, "the first agent stopped heartbeating"
        time.sleep(0.1)


@pytest.mark.parametrize("socket_file", ["kept", "removed"])
def test_a_second_agent_on_the_same_state_path_is_refused_and_writes_nothing(
    tmp_path, first, socket_file
):
    if socket_file == "removed":
        os.unlink(tmp_path / "a" / "admin.sock")  # it used to be the only guard
    before = _dump(_db_file(tmp_path))
    second = AgentProcess(_conf(tmp_path / "a2.conf", tmp_path / "a"))
    line = _refused(second)
    assert line == (
        f"compute-agent: error: another compute-agent (pid {first.proc.pid}) holds "
        f"{tmp_path}/a/compute-agent.lock: it runs for this state_path; stop it first"
    )
    assert _dump(_db_file(tmp_path)) == before
    assert first.proc.poll() is None
    _still_heartbeating(_db_file(tmp_path))


def test_a_second_agent_with_its_own_state_path_and_the_same_database_is_refused(tmp_path, first):
    before = _dump(_db_file(tmp_path))
    second = AgentProcess(_conf(tmp_path / "b.conf", tmp_path / "b", db_path=_db_file(tmp_path)))
    line = _refused(second)
    assert line.startswith(
        f"compute-agent: error: host {HOST} is held by another compute-agent (owner token "
    )
    assert "last heartbeat " in line and "it is up (service_down_time 60 s)" in line
    assert _dump(_db_file(tmp_path)) == before
    assert not (tmp_path / "b" / "admin.sock").exists()
    _still_heartbeating(_db_file(tmp_path))
    # The first one still owns the host: its stop is written.
    rc, _ = first.terminate()
    assert rc == 0, first.output
    row = Database(f"sqlite:///{_db_file(tmp_path)}").service_get(HOST, BINARY)
    assert row.stopped_at is not None


def test_an_agent_killed_outright_is_replaced_at_once(tmp_path, first):
    owner = _dump(_db_file(tmp_path))["services"][0][6]
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait(10)
    # Its heartbeat is fresh and its row says running, but the lock file
    # names it as the last holder: its successor on this state_path may take over.
    again = AgentProcess(_conf(tmp_path / "a.conf", tmp_path / "a"))
    try:
        again.wait_for("heartbeat 1")
        assert "removing the stale admin socket" in again.output
        new_owner = _dump(_db_file(tmp_path))["services"][0][6]
        assert new_owner != owner and new_owner is not None
        rc, _ = again.terminate()
        assert rc == 0, again.output
    finally:
        again.kill()


def test_an_agent_whose_row_is_taken_stops_writing_and_exits_3(tmp_path, first):
    with sqlite3.connect(_db_file(tmp_path)) as conn:
        conn.execute("UPDATE services SET owner = 'thief'")
    rc = first.wait_exit(30)
    assert rc == EXIT_DISPLACED, first.output
    errors = [line for line in first.lines if " ERROR " in line]
    assert len(errors) == 1 and f"ownership of host {HOST} lost" in errors[0], first.output
    assert "compute-agent stopped" in first.output
    after = _dump(_db_file(tmp_path))["services"][0]
    assert after[5] is None and after[6] == "thief"  # no stopped_at written over the thief's row
