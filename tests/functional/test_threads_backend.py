"""A real agent on the native-threads backend.

Chosen by ``[DEFAULT] concurrency_backend = threads`` (the first test) or by
``COMPUTE_AGENT_CONCURRENCY=threads`` (the second). The agent runs on
``test:///default`` and SQLite; the CLI talks to it over the admin socket, a
scheduler over RPC on the shared RabbitMQ (its own exchange and host name,
``tests.functional.rabbit``), and SIGTERM stops it within its shutdown
timeout. Neither the agent nor the CLI loads eventlet or greenlet, or
prints a deprecation warning.
"""

from __future__ import annotations

import json
import re
import urllib.request
import uuid as uuidlib
from concurrent.futures import ThreadPoolExecutor

import pytest

from compute_agent import __version__, exception
from compute_agent.rpcapi import ComputeAPI
from tests.functional.agent_process import (
    AgentProcess,
    free_port,
    manage,
    manage_all,
    manage_loaded,
    synced_config,
)
from tests.functional.rabbit import RabbitRun

THREADS_DEFAULT = "report_interval = 1\n"
THREADS_COMPUTE = "[compute]\nstats_interval = 1\nshutdown_timeout = 10\n"
VARIABLE = "COMPUTE_AGENT_CONCURRENCY"
NO_GREEN = {"eventlet": False, "greenlet": False}
# eventlet's notice ("Eventlet is deprecated") and any library's DeprecationWarning.
DEPRECATION = re.compile(r"deprecat", re.IGNORECASE)


def test_an_agent_on_native_threads_serves_the_cli_and_stops_cleanly(tmp_path):
    default = THREADS_DEFAULT + "concurrency_backend = threads\n"
    files = synced_config(tmp_path, "threads-host", default=default, rest=THREADS_COMPUTE)
    port = free_port()
    # The config file chooses; the variable (set for the threads pass of the suite) must not.
    agent = AgentProcess(files, metrics_port=port, drop_env=(VARIABLE,))
    try:
        agent.wait_for("heartbeat 3")
        assert f"concurrency backend threads from [DEFAULT] concurrency_backend in {files[1]}" in (
            agent.output
        )
        version, loaded = manage_loaded("db", "version", config_files=files, drop_env=(VARIABLE,))
        assert (version.returncode, version.stderr, loaded) == (0, "", []), version.stderr
        status, loaded = manage_loaded(
            "status", "-f", "json", config_files=files, drop_env=(VARIABLE,)
        )
        assert (status.returncode, status.stderr, loaded) == (0, "", []), status.stderr
        backend = json.loads(status.stdout)["concurrency"]
        assert backend["backend"] == "threads" and backend["loaded"] == NO_GREEN, backend
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
            text = reply.read().decode()
        assert 'compute_agent_concurrency_backend{backend="threads"} 1.0' in text
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
        # The boot's STARTED event may be syncing the instance at this moment:
        # the forced run then skips it (its lock is held), which is as good.
        synced = json.loads(sync.stdout)
        assert synced["checked"] + synced["skipped"] == 1 and synced["errors"] == 0, synced
        assert synced["aborted"] in (None, "")
        rc, took = agent.terminate(timeout=15)
    finally:
        agent.kill()
    assert rc == 0, agent.output
    assert took < 10, agent.output
    assert "compute-agent stopped" in agent.output
    assert "Traceback" not in agent.output, agent.output
    assert not DEPRECATION.search(agent.output), agent.output


def test_an_agent_on_native_threads_serves_rpc_and_stops_cleanly(tmp_path):
    run = RabbitRun()
    host = run.host("threads-rpc")
    files = synced_config(
        tmp_path, host, head=run.conf_text(), default=THREADS_DEFAULT, rest=THREADS_COMPUTE
    )
    agent = AgentProcess(files, extra_env={"COMPUTE_AGENT_CONCURRENCY": "threads"})
    api = None
    try:
        agent.wait_for("RPC serving")
        status, loaded = manage_loaded(
            "status", "-f", "json", config_files=files, extra_env={VARIABLE: "threads"}
        )
        assert (status.returncode, status.stderr, loaded) == (0, "", []), status.stderr
        assert json.loads(status.stdout)["concurrency"]["loaded"] == NO_GREEN
        api = ComputeAPI(run.conf(), timeout=15)
        assert api.ping(host) == {"host": host, "version": __version__}
        request = {"uuid": str(uuidlib.uuid4()), "name": "t-rpc", "vcpus": 1, "memory_mb": 64}
        built = api.build_instance(host, request)
        assert built is not None and built["host"] == host
        assert (built["vm_state"], built["task_state"], built["power_state"]) == (
            "active",
            None,
            "running",
        )
        assert api.get_instance_info(host, request["uuid"]) == built
        stopped = api.stop_instance(host, request["uuid"])
        assert stopped is not None
        assert (stopped["vm_state"], stopped["power_state"]) == ("stopped", "shutdown")
        started = api.start_instance(host, request["uuid"])
        assert started is not None
        assert (started["vm_state"], started["power_state"]) == ("active", "running")
        # The start's STARTED event may be syncing the instance at this moment:
        # the forced run then skips it (its lock is held) rather than wait.
        summary = api.sync_power_states(host)
        assert (summary["checked"] + summary["skipped"], summary["changed"]) == (1, 0), summary
        assert summary["errors"] == 0, summary
        deleted = api.delete_instance(host, request["uuid"])
        assert deleted is not None and deleted["vm_state"] == "deleted"
        with pytest.raises(exception.InstanceNotFound):
            api.get_instance_info(host, request["uuid"])
        # Several calls in flight at once, as a scheduler sends them.
        requests = [{**request, "uuid": str(uuidlib.uuid4()), "name": f"t-{i}"} for i in range(4)]
        with ThreadPoolExecutor(4) as pool:
            built_all = list(pool.map(lambda r: api.build_instance(host, r), requests))
            assert all(b is not None and b["vm_state"] == "active" for b in built_all)
            summary = api.sync_power_states(host)
            assert summary["checked"] + summary["skipped"] == 4 and summary["errors"] == 0
            uuids = [r["uuid"] for r in requests]
            gone = list(pool.map(lambda u: api.delete_instance(host, u), uuids))
            assert all(g is not None and g["vm_state"] == "deleted" for g in gone)
        assert api.list_instances(host) == []
        rc, took = agent.terminate(timeout=15)
    finally:
        agent.kill()
        if api is not None:
            api.close()
        run.cleanup()
    assert rc == 0, agent.output
    assert took < 5, agent.output
    assert "RPC stopped" in agent.output and "compute-agent stopped" in agent.output
    assert "Traceback" not in agent.output, agent.output
    assert not DEPRECATION.search(agent.output), agent.output
