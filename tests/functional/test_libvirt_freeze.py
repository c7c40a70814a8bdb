"""Fault: the agent's libvirtd frozen past the keepalive and thawed, again and again.

libvirt 9.0's client crashed the agent (SIGSEGV) when a daemon frozen past
the keepalive was thawed while several threads waited on one connection.
Each connection now carries one call at a time (virt/libvirt/pool.py). A
busy agent (statistics, syncs, admin clients, scrapes) on each backend (the
backend of the run: `make test` runs it once on each) must
live through every cycle, reconnect, get its events again and sync every
instance. The long version, 20 cycles a backend, is
``python -m bench.libvirt_thaw_drill agent`` (docs/reliability.md).
"""

from __future__ import annotations

import os
import pathlib
import shutil
import signal
import tempfile
import time

import pytest

from compute_agent import exception, green
from compute_agent.virt.libvirt.host import Host
from tests.functional.agent_process import REPO, AgentProcess, manage
from tests.functional.libvirt_drill import KEEPALIVE, Drill, private_libvirtd
from tests.helpers import wait_until

pytestmark = pytest.mark.slow

FREEZES = 5
FREEZE_S = sum(KEEPALIVE) + 2.0  # past the keepalive: every connection is closed


def test_the_agent_lives_through_freezes_past_the_keepalive_and_a_restart():
    # The agent runs on the backend of this run: make test's second pass is threads.
    backend = os.environ.get("COMPUTE_AGENT_CONCURRENCY", "eventlet")
    # Not tmp_path: the daemon runs as nobody and must reach its directory.
    root = pathlib.Path(tempfile.mkdtemp(prefix="ca-freeze-"))
    drill = Drill(root, backend, instances=20)
    try:
        drill.start()
        drill.start_load()
        cycles = [drill.freeze(FREEZE_S) for _ in range(FREEZES)]
        cycles.append(drill.freeze(1.0))  # shorter than the keepalive: nothing is lost
        cycles.append(drill.kill_and_restart())
        for cycle in cycles:
            assert cycle.alive, (cycle, drill.agent.output[-3000:])
            assert cycle.back_s is not None, cycle  # connected again, every instance synced
            assert cycle.checked == drill.instances, cycle
            assert cycle.events_back, cycle  # lifecycle events registered again
            assert cycle.enabled_after, cycle  # the AUTO: disable lifted
        lost = [c for c in cycles if c.kind in ("freeze", "kill")]
        assert all(c.lost_seen and c.disabled_seen for c in lost), cycles
        connections = drill.status()["libvirt"]["connections"]
        assert connections["size"] == 4 and connections["stuck"] == 0, connections
        assert connections["opened_total"] >= len(lost), connections
        status = manage("status", config_files=drill.config_files)
        assert status.returncode == 0, status.stderr
        assert drill.load.ok["status"] > 0 and drill.load.ok["scrape"] > 0
    finally:
        rc = drill.stop()
        shutil.rmtree(root, ignore_errors=True)
    assert rc == 0, drill.agent.output[-3000:] if drill.agent else rc
    output = drill.agent.output
    assert "Fatal Python error" not in output and "Traceback" not in output, output[-3000:]
    assert output.count("libvirt connection restored") >= FREEZES + 1


def test_an_open_on_a_frozen_libvirtd_ends_at_its_deadline_and_connects_after_the_thaw():
    """libvirt's open has no deadline: on a hung libvirtd it held the agent's start,
    and a SIGTERM with it, until systemd killed the agent (an operator-style attack)."""
    root = pathlib.Path(tempfile.mkdtemp(prefix="ca-open-"))
    daemon, uri = private_libvirtd(root / "lv")
    changes: list[bool] = []
    host = Host(
        uri,
        lambda up, _why: changes.append(up),
        lambda *_: None,
        keepalive=(1, 1),  # an open waits 2 s
        reconnect_min=0.5,
        reconnect_max=1.0,
    )
    try:
        os.kill(daemon.pid, signal.SIGSTOP)
        t0 = green.monotonic()
        with pytest.raises(
            exception.HypervisorUnavailable, match="did not answer an open within 2 s"
        ):
            host.start(events=True)
        took = green.monotonic() - t0
        # The reconnection waits for that open rather than starting more of them.
        assert wait_until(lambda: "has not answered an open" in (host.last_error or ""), 10)
        os.kill(daemon.pid, signal.SIGCONT)
        assert wait_until(lambda: host.connected, 30), host.last_error
        print(f"\nopen given up after {took:.2f} s; connected after the thaw")
        assert took < host.open_timeout + 3, took
        assert changes and changes[-1] is True
    finally:
        os.kill(daemon.pid, signal.SIGCONT)
        host.stop()
        daemon.terminate()
        daemon.wait(10)
        shutil.rmtree(root, ignore_errors=True)


def test_an_agent_whose_libvirtd_hangs_at_its_start_stops_on_sigterm_at_once(tmp_path):
    """The same attack on the agent: SIGTERM during that start waited for libvirtd for
    ever, then (with the open's deadline) until the deadline, 20 s by default; a stop
    request now ends the start's wait at once."""
    root = pathlib.Path(tempfile.mkdtemp(prefix="ca-open-agent-"))
    daemon, uri = private_libvirtd(root / "lv")
    conf = tmp_path / "agent.conf"
    conf.write_text(
        f"[DEFAULT]\nstate_path = {tmp_path}/state\nhost = hung-start\n"
        f"[libvirt]\nconnection_uri = {uri}\nkeepalive_interval = 5\nkeepalive_count = 3\n"
    )
    config = [REPO / "etc" / "compute-agent.conf", conf]
    assert manage("db", "sync", config_files=config).returncode == 0
    os.kill(daemon.pid, signal.SIGSTOP)
    agent = AgentProcess(config)
    try:
        agent.wait_for("compute-agent starting on host", 60)
        time.sleep(1.0)  # inside the open, whose deadline is 20 s
        t0 = time.monotonic()
        agent.proc.send_signal(signal.SIGTERM)
        rc = agent.proc.wait(60)
        took = time.monotonic() - t0
        agent._reader.join(2)
    finally:
        agent.kill()
        os.kill(daemon.pid, signal.SIGCONT)
        daemon.terminate()
        daemon.wait(10)
        shutil.rmtree(root, ignore_errors=True)
    print(f"\nSIGTERM during a hung open: exit {rc} after {took:.2f} s")
    assert rc == 0, agent.output[-3000:]
    assert "stop requested while starting: the start is given up" in agent.output
    assert "did not answer an open" not in agent.output
    assert "started periodic tasks" not in agent.output
    assert took < 8, took
