"""The real agent started on a database that refuses it for load: it waits, then serves.

The server refuses for real: the agent's account is allowed one connection
(``CONNECTION LIMIT 1``) and the test holds it, as a server at its
max_connections refuses every newcomer ("sorry, too many clients",
SQLSTATE 53300). On both concurrency backends.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from compute_agent.db import migration
from compute_agent.db.api import Database
from tests.busy_role import BusyAccount
from tests.functional.agent_process import REPO, AgentProcess

BACKENDS = ["eventlet", "threads"]


@pytest.fixture
def account(db_url_factory) -> Iterator[BusyAccount]:
    url = db_url_factory("postgresql")
    owner = Database(url)
    migration.upgrade(owner)
    owner.dispose()
    busy = BusyAccount(url)
    yield busy
    busy.drop()


def _config(where, url: str, start_timeout: float) -> list:
    where.mkdir(exist_ok=True)
    path = where / "busy.conf"
    path.write_text(
        f"[DEFAULT]\nstate_path = {where}/state\nhost = busy-host-{where.name}\n"
        "report_interval = 1\nperiodic_fuzzy_delay = 0\n"
        # One connection: all the account may have.
        f"[database]\nconnection = {url}\npool_size = 1\n"
        f"busy_start_timeout = {start_timeout}\n"
    )
    return [REPO / "etc" / "compute-agent.conf", path]


@pytest.mark.parametrize("backend", BACKENDS)
def test_start_waits_for_a_busy_database_then_serves(backend, account, tmp_path):
    account.hold()
    agent = AgentProcess(
        _config(tmp_path / backend, account.url, 60),
        extra_env={"COMPUTE_AGENT_CONCURRENCY": backend},
    )
    try:
        agent.wait_for("checking the database schema: database unavailable", 60)
        time.sleep(2)
        assert agent.proc.poll() is None, agent.output  # waiting, not dead
        retries = [line for line in agent.lines if "retrying in" in line]
        assert "53300" in retries[0] and "too many connections" in retries[0], retries
        account.release()
        agent.wait_for("heartbeat 2", 60)
        rc, _ = agent.terminate(timeout=30)
    finally:
        agent.kill()
    assert rc == 0, agent.output
    # One line per pause, never one per refused attempt in a tight loop.
    waited = len([line for line in agent.lines if "retrying in" in line])
    assert 1 <= waited <= 15, agent.output
    errors = [line for line in agent.lines if "ERROR" in line or "Traceback" in line]
    assert errors == [], errors


def test_start_gives_up_at_busy_start_timeout_with_one_line(account, tmp_path):
    account.hold()
    agent = AgentProcess(_config(tmp_path / "short", account.url, 2))
    try:
        rc = agent.wait_exit(60)
    finally:
        agent.kill()
    assert rc == 1, agent.output
    final = [line for line in agent.lines if line.startswith("compute-agent: error:")]
    assert len(final) == 1, agent.output
    assert "cannot use database" in final[0] and "still refused after" in final[0], final
