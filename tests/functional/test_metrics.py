"""The /metrics endpoint of a running agent: families, per-instance series, real guests.

The agent runs as a process, as an operator runs it: on libvirt's test
driver and SQLite, then (one short test) on the real libvirtd with one
small QEMU guest, whose CPU time and resident memory must be real.
"""

from __future__ import annotations

import pathlib
import socket
import urllib.request
import uuid as uuidlib
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from prometheus_client.parser import text_string_to_metric_families

from compute_agent.admin.client import AdminClient
from tests.functional import qemu
from tests.functional.agent_process import REPO, AgentProcess, free_port, manage
from tests.helpers import eventually

# Every family the issue names, as the text format's TYPE lines name them.
FAMILIES = {
    "compute_agent_hub_lag_seconds": "histogram",
    "compute_agent_heartbeat_age_seconds": "gauge",
    "compute_agent_service_disabled": "gauge",
    "compute_agent_periodic_task_duration_seconds": "histogram",
    "compute_agent_periodic_task_failures_total": "counter",
    "compute_agent_power_sync_instances_total": "counter",
    "compute_agent_requests_total": "counter",
    "compute_agent_request_duration_seconds": "histogram",
    "compute_agent_libvirt_connected": "gauge",
    "compute_agent_libvirt_connections": "gauge",
    "compute_agent_libvirt_connections_set_aside_total": "counter",
    "compute_agent_libvirt_call_duration_seconds": "histogram",
    "compute_agent_instances": "gauge",
    "compute_agent_builds_in_progress": "gauge",
    "compute_agent_builds_queued": "gauge",
    "compute_agent_lifecycle_events_total": "counter",
    "compute_agent_instance_info": "gauge",
    "compute_agent_instance_cpu_seconds_total": "counter",
    "compute_agent_instance_memory_rss_bytes": "gauge",
    "compute_agent_instance_vcpus": "gauge",
    "compute_agent_instance_block_read_bytes_total": "counter",
    "compute_agent_instance_block_write_bytes_total": "counter",
    "compute_agent_instance_network_receive_bytes_total": "counter",
    "compute_agent_instance_network_transmit_bytes_total": "counter",
    "compute_agent_instance_stats_unresponsive": "gauge",
    "compute_agent_instance_stats_age_seconds": "gauge",
}
# A client chooses instance names: quotes and backslashes must come back intact.
AWKWARD_NAME = 'web "front" \\ n\u00e9e'


@dataclass
class Agent:
    proc: AgentProcess
    port: int
    admin: AdminClient

    def text(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=10) as r:
            assert r.status == 200
            assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            return r.read().decode()

    def samples(self, name: str) -> list:
        """The samples named ``name`` (a sample's full name, e.g. with ``_total``)."""
        return [
            s
            for family in text_string_to_metric_families(self.text())
            for s in family.samples
            if s.name == name
        ]

    def of(self, name: str, uuid: str) -> list:
        return [s for s in self.samples(name) if s.labels.get("uuid") == uuid]


def _config(root: pathlib.Path, extra: str = "") -> list[pathlib.Path]:
    path = root / "test.conf"
    path.write_text(
        f"[DEFAULT]\nstate_path = {root}/state\nhost = metrics-host\nreport_interval = 1\n"
        "periodic_fuzzy_delay = 0\n[compute]\nstats_interval = 1\n" + extra
    )
    return [REPO / "etc" / "compute-agent.conf", path]


def _start(root: pathlib.Path, extra: str = "") -> Agent:
    files = _config(root, extra)
    synced = manage("db", "sync", config_files=files)
    assert synced.returncode == 0, synced.stderr
    port = free_port()
    proc = AgentProcess(files, metrics_port=port)
    proc.wait_for("heartbeat 1")
    return Agent(proc, port, AdminClient(str(root / "state" / "admin.sock"), timeout=120))


def _stop(agent: Agent) -> None:
    rc, _ = agent.proc.terminate()
    agent.proc.kill()
    assert rc == 0, agent.proc.output
    assert "Traceback" not in agent.proc.output, agent.proc.output


@pytest.fixture
def agent(tmp_path) -> Iterator[Agent]:
    agent = _start(tmp_path)
    try:
        yield agent
    finally:
        agent.proc.kill()


def test_every_family_is_served(agent):
    text = agent.text()
    types = dict(line.split()[2:4] for line in text.splitlines() if line.startswith("# TYPE "))
    missing = {n: t for n, t in FAMILIES.items() if types.get(n) is None}
    assert not missing, text
    for name, kind in FAMILIES.items():
        assert types[name] == kind, name
    # Host figures have values at once; the heartbeat is fresh, libvirt is up.
    (age,) = agent.samples("compute_agent_heartbeat_age_seconds")
    assert 0 <= age.value < 30
    assert [s.value for s in agent.samples("compute_agent_libvirt_connected")] == [1.0]
    assert [s.value for s in agent.samples("compute_agent_service_disabled")] == [0.0]
    tasks = {s.labels["task"] for s in agent.samples("compute_agent_periodic_task_failures_total")}
    assert {"heartbeat", "power_sync", "stats"} <= tasks
    # Only /metrics is served.
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"http://127.0.0.1:{agent.port}/nothing", timeout=10)
    assert err.value.code == 404
    _stop(agent)


def test_instance_series_follow_a_build_and_a_delete(agent):
    uuid = str(uuidlib.uuid4())
    built = agent.admin.call(
        "build_instance",
        {"instance": {"uuid": uuid, "name": AWKWARD_NAME, "vcpus": 2, "memory_mb": 64}},
    )
    assert built["vm_state"] == "active"
    # At once, from the operation's result.
    (info,) = agent.of("compute_agent_instance_info", uuid)
    assert info.labels == {
        "uuid": uuid,
        "name": AWKWARD_NAME,
        "vm_state": "active",
        "power_state": "running",
    }
    assert " \\\\ n" in agent.text()  # the backslash is escaped on the wire
    # From the next statistics cycle (every second here). The test driver
    # reports a domain's state only: no CPU, memory or I/O series for it.
    (age,) = eventually(
        lambda: agent.of("compute_agent_instance_stats_age_seconds", uuid),
        30,
        "a statistics sample of the new instance",
    )
    assert age.labels == {"uuid": uuid, "name": AWKWARD_NAME}
    assert 0 <= age.value < 30
    assert [s.value for s in agent.of("compute_agent_instance_vcpus", uuid)] == [2.0]
    assert [s.value for s in agent.of("compute_agent_instance_stats_unresponsive", uuid)] == [0.0]
    counts = {
        (s.labels["vm_state"], s.labels["power_state"]): s.value
        for s in agent.samples("compute_agent_instances")
    }
    assert counts.get(("active", "running"), 0) >= 1
    requests = {
        (s.labels["front"], s.labels["method"], s.labels["outcome"]): s.value
        for s in agent.samples("compute_agent_requests_total")
    }
    assert requests[("admin", "build_instance", "ok")] == 1
    assert any(
        s.labels["call"] == "all_stats"
        for s in agent.samples("compute_agent_libvirt_call_duration_seconds_count")
    )

    # A refused request is counted under its error type.
    with pytest.raises(Exception):  # noqa: B017 - the admin client's own error type
        agent.admin.call("start_instance", {"instance_uuid": "not-a-uuid"})
    requests = {
        (s.labels["front"], s.labels["method"], s.labels["outcome"]): s.value
        for s in agent.samples("compute_agent_requests_total")
    }
    assert requests[("admin", "start_instance", "InvalidInput")] == 1

    agent.admin.call("delete_instance", {"instance_uuid": uuid})
    text = agent.text()
    assert uuid not in text, text
    # Nor does the next statistics cycle bring it back.
    before = eventually(lambda: agent.admin.call("status")["periodic_tasks"], 10, "status")
    runs = {t["name"]: t["runs"] for t in before}["stats"]
    eventually(
        lambda: (
            {t["name"]: t["runs"] for t in agent.admin.call("status")["periodic_tasks"]}["stats"]
            >= runs + 2
        ),
        30,
        "two more statistics cycles",
    )
    assert uuid not in agent.text()
    _stop(agent)


def test_a_taken_port_stops_the_agent_with_one_line(tmp_path):
    files = _config(tmp_path)
    assert manage("db", "sync", config_files=files).returncode == 0
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        proc = AgentProcess(files, metrics_port=port)
        rc = proc.wait_exit(60)
    assert rc == 2, proc.output
    assert proc.lines == [
        f"compute-agent: error: [metrics] cannot listen on 127.0.0.1:{port}: "
        "Address already in use (listen_port = 0 turns the endpoint off)"
    ]
    # It gave the admin socket back: an agent can start there now.
    assert not (tmp_path / "state" / "admin.sock").exists()


def test_real_qemu_guest_reports_cpu_and_memory(tmp_path):
    """One small diskless guest: CPU seconds and RSS come from QEMU, not a stand-in."""
    prefix = qemu.new_prefix()
    agent = _start(
        tmp_path,
        f"instance_name_template = {qemu.name_template(prefix)}\n"
        "shutdown_timeout = 1\n"
        "[libvirt]\nconnection_uri = qemu:///system\nvirt_type = qemu\n"
        "lifecycle_event_delay = 1\n",
    )
    uuid = str(uuidlib.uuid4())
    try:
        agent.admin.call(
            "build_instance",
            {"instance": {"uuid": uuid, "name": "metrics-guest", "vcpus": 1, "memory_mb": 64}},
        )

        def measured() -> tuple[float, float] | None:
            cpu = agent.of("compute_agent_instance_cpu_seconds_total", uuid)
            rss = agent.of("compute_agent_instance_memory_rss_bytes", uuid)
            if cpu and rss and cpu[0].value > 0 and rss[0].value > 0:
                return cpu[0].value, rss[0].value
            return None

        cpu_s, rss = eventually(measured, 60, "CPU time and RSS of the guest")
        assert 0 < cpu_s < 3600
        assert 1 << 20 < rss < 4 << 30  # QEMU's own process: megabytes, not bytes or terabytes
        agent.admin.call("delete_instance", {"instance_uuid": uuid})
        assert uuid not in agent.text()
        _stop(agent)
    finally:
        agent.proc.kill()
        qemu.remove_domains(prefix)
