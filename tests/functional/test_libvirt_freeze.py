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
import tempfile

import pytest

from tests.functional.agent_process import manage
from tests.functional.libvirt_drill import KEEPALIVE, Drill

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
