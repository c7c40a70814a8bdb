"""The agent as a process: start on the embedded default, heartbeat, stop on SIGTERM."""

import signal

import pytest

from compute_agent.db.api import Database
from compute_agent.service import BINARY
from tests.functional.agent_process import REPO, AgentProcess, manage


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "test.conf"
    path.write_text(
        f"[DEFAULT]\nstate_path = {tmp_path}/state\nhost = proc-host\nreport_interval = 1\n"
        "periodic_fuzzy_delay = 0\n"
    )
    # The shipped sample first, as `make run` uses it, then the test's overrides.
    return [REPO / "etc" / "compute-agent.conf", path]


def _db(tmp_path) -> Database:
    return Database(f"sqlite:///{tmp_path}/state/compute-agent.sqlite")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_agent_heartbeats_and_stops_cleanly(tmp_path, config, sig):
    assert manage("db", "sync", config_files=config).returncode == 0
    agent = AgentProcess(config)
    try:
        agent.wait_for("heartbeat 2")
        rc, elapsed = agent.terminate(sig)
    finally:
        agent.kill()
    assert rc == 0, agent.output
    assert elapsed < 5
    assert "compute-agent stopped" in agent.output
    assert "Warning" not in agent.output and "Traceback" not in agent.output
    # No transport_url in the sample: no RPC, said once.
    assert agent.output.count("RPC disabled: no [DEFAULT] transport_url") == 1
    row = _db(tmp_path).service_get("proc-host", BINARY)
    assert row.stopped_at is not None and row.report_count >= 2


def test_agent_refuses_an_unmigrated_database(config):
    agent = AgentProcess(config)
    rc = agent.proc.wait(60)
    agent._reader.join(2)
    assert rc == 1
    assert agent.lines == [
        line for line in agent.lines if line.startswith("compute-agent: error: ")
    ]
    assert "has no schema; run 'compute-agent-manage db sync'" in agent.output


def test_manage_db_sync_and_version(config):
    first = manage("db", "sync", config_files=config)
    second = manage("db", "sync", config_files=config)
    version = manage("db", "version", config_files=config)
    assert first.returncode == second.returncode == version.returncode == 0
    assert "migrated from empty to 0003" in first.stdout
    assert "already at revision 0003" in second.stdout
    assert version.stdout.strip() == "current 0003, head 0003"


def test_manage_usage_errors_exit_2(config):
    proc = manage("db", "explode", config_files=config)
    assert proc.returncode == 2 and "invalid choice" in proc.stderr


def test_manage_database_error_is_one_line(tmp_path):
    path = tmp_path / "pg.conf"
    path.write_text(
        f"[DEFAULT]\nstate_path = {tmp_path}\n[database]\n"
        "connection = postgresql://nobody:hunter2@127.0.0.1:1/none\n"
    )
    proc = manage("db", "sync", config_files=[path])
    assert proc.returncode == 1
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "hunter2" not in proc.stderr
