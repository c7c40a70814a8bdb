"""Two agents with one host name on one broker, separate databases: the second stops.

Each has its own state_path and SQLite database, so neither the lock nor
the service row can see the other; only the broker can. Real RabbitMQ.
"""

from __future__ import annotations

import datetime as dt
import signal
import subprocess

from compute_agent.rpcapi import ComputeAPI
from tests.functional.agent_process import AgentProcess, manage
from tests.functional.rabbit import RabbitRun


def _agent(tmp_path, name: str, host: str, rabbit_conf) -> list:
    path = tmp_path / f"{name}.conf"
    path.write_text(
        f"[DEFAULT]\nhost = {host}\nstate_path = {tmp_path}/{name}\ncompute_driver = fake\n"
        "report_interval = 1\nperiodic_fuzzy_delay = 0\nrpc_duplicate_check_timeout = 3\n"
    )
    config = [rabbit_conf, path]
    assert manage("db", "sync", config_files=config).returncode == 0
    return config


def _logged_at(line: str) -> float:
    return dt.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()


def test_a_second_agent_with_the_same_host_name_on_the_broker_stops(tmp_path):
    run = RabbitRun()
    host = run.host("dup-host")
    rabbit_conf = tmp_path / "rabbit.conf"
    rabbit_conf.write_text(run.conf_text())
    first = second = None
    api = None
    try:
        first = AgentProcess(_agent(tmp_path, "a", host, rabbit_conf))
        first.wait_for("RPC serving", timeout=60)  # no answer to its own ping: it serves
        connecting, serving = (
            _logged_at(next(line for line in first.lines if needle in line))
            for needle in ("RPC connecting", "RPC serving")
        )
        print(f"\nfirst agent: RPC serving {serving - connecting:.1f} s after connecting")
        assert serving - connecting >= 3  # it did wait for an answer
        second = AgentProcess(_agent(tmp_path, "b", host, rabbit_conf))
        try:
            rc = second.wait_exit(60)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the second agent still runs:\n{second.output}") from None
        assert rc == 1, second.output
        errors = [line for line in second.lines if " ERROR " in line]
        assert len(errors) == 1, second.output
        assert f"already answers RPC as server {host}" in errors[0]
        assert "RPC serving" not in second.output
        # The first one still answers every call, not every other one.
        api = ComputeAPI(run.conf(), timeout=15)
        for _ in range(5):
            assert api.ping(host)["host"] == host
        first.proc.send_signal(signal.SIGTERM)
        try:
            rc = first.wait_exit(30)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the first agent did not stop:\n{first.output}") from None
        assert rc == 0, first.output
    finally:
        for agent in (first, second):
            if agent is not None:
                agent.kill()
        if api is not None:
            api.close()
        run.cleanup()
