"""A real agent on the native-threads backend (``COMPUTE_AGENT_CONCURRENCY=threads``).

The agent runs on ``test:///default`` and SQLite without a message bus; the
CLI talks to it over the admin socket, and SIGTERM stops it within its
shutdown timeout.
"""

from __future__ import annotations

import json

from tests.functional.agent_process import REPO, AgentProcess, manage, manage_all


def test_an_agent_on_native_threads_serves_the_cli_and_stops_cleanly(tmp_path):
    conf = tmp_path / "threads.conf"
    conf.write_text(
        f"[DEFAULT]\nstate_path = {tmp_path}/state\nhost = threads-host\nreport_interval = 1\n"
        "periodic_fuzzy_delay = 0\n[compute]\nstats_interval = 1\nshutdown_timeout = 10\n"
    )
    files = [REPO / "etc" / "compute-agent.conf", conf]
    synced = manage("db", "sync", config_files=files)
    assert synced.returncode == 0, synced.stderr
    agent = AgentProcess(files, extra_env={"COMPUTE_AGENT_CONCURRENCY": "threads"})
    try:
        agent.wait_for("heartbeat 3")
        booted = manage(
            "instances", "boot", "--name", "t1", "--vcpus", "1", "--memory-mb", "64",
            config_files=files,
        )  # fmt: skip
        assert booted.returncode == 0, booted.stderr
        status, sync = manage_all([["status", "-f", "json"], ["power-sync", "-f", "json"]], files)
        assert status.returncode == 0, status.stderr
        state = json.loads(status.stdout)
        assert state["host"] == "threads-host" and state["libvirt"]["connected"] is True
        assert state["host_state"]["service"]["disabled"] is False
        assert sync.returncode == 0, sync.stderr
        assert json.loads(sync.stdout)["checked"] == 1
        assert json.loads(sync.stdout)["aborted"] in (None, "")
        rc, took = agent.terminate(timeout=15)
    finally:
        agent.kill()
    assert rc == 0, agent.output
    assert took < 10, agent.output
    assert "compute-agent stopped" in agent.output
    assert "Traceback" not in agent.output, agent.output
