"""The CLI against an agent that cannot or will not answer: exit 3 within the deadline.

A real agent (test:///default, SQLite) per module; one test stops it with
SIGSTOP (the kernel still queues connections, nothing answers), the other
floods its admin socket with clients that send a byte a second.
"""

import signal
import socket
import threading
import time

import pytest

from tests.functional.agent_process import AgentProcess, manage, manage_all, synced_config

PREFIX = "compute-agent-manage: error: "
# A CLI process spends about a second importing; a loaded machine more.
SLACK = 15.0


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("deadlines")
    files = synced_config(root, "deadline-host", rest="[compute]\nstats_interval = 0\n")
    agent = AgentProcess(files)
    try:
        agent.wait_for("admin socket listening")
        yield root, files, agent
        agent.proc.send_signal(signal.SIGCONT)
        rc, _ = agent.terminate()
        assert rc == 0, agent.output
        assert "Traceback" not in agent.output, agent.output
    finally:
        agent.proc.send_signal(signal.SIGCONT)
        agent.kill()


def test_a_stopped_agent_is_exit_3_within_the_deadline(env):
    root, files, agent = env
    sock = root / "state" / "admin.sock"
    agent.proc.send_signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        # The default deadline (30 s) is unit-tested (test_manage_cli).
        status, sync, listing = manage_all(
            [
                ["status", "--timeout", "3"],
                ["power-sync", "--timeout", "3"],
                ["instances", "list", "--timeout", "3"],
            ],
            config_files=files,
        )
        took = time.monotonic() - started
    finally:
        agent.proc.send_signal(signal.SIGCONT)
    for proc in (status, sync, listing):
        assert proc.returncode == 3, proc.stderr
        lines = proc.stderr.splitlines()
        assert len(lines) == 1, proc.stderr  # one line, no traceback
        assert lines[0].startswith(f"{PREFIX}no answer from the agent on {sock} after ")
    assert "after 3." in status.stderr
    print(f"\nstopped agent: 3 s deadlines, batch of 3 CLIs took {took:.1f} s")
    assert took < 3 + SLACK
    # Awake again, it answers.
    again = manage("status", "-f", "value", config_files=files)
    assert again.returncode == 0, again.stderr


class Trickler:
    """``count`` clients that each send a byte of a request a second, for ``seconds``."""

    def __init__(self, path, count, seconds):
        self.path = str(path)
        self.count = count
        self.end = time.monotonic() + seconds
        self.dropped = 0
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._one, daemon=True) for _ in range(count)]
        for t in self.threads:
            t.start()

    def _one(self):
        payload = b'{"method": "status", "args": {}}\n'
        while time.monotonic() < self.end:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(5)
            try:
                s.connect(self.path)
                for byte in payload:
                    if time.monotonic() >= self.end:
                        break
                    s.sendall(bytes([byte]))
                    time.sleep(1)
            except OSError:
                with self._lock:
                    self.dropped += 1  # the agent dropped it: reconnect, as a flood would
            finally:
                s.close()

    def join(self):
        for t in self.threads:
            t.join(10)


def test_the_cli_gets_through_a_flood_of_slow_clients(env):
    root, files, agent = env
    before = len(agent.lines)
    flood = Trickler(root / "state" / "admin.sock", 80, seconds=15)
    try:
        time.sleep(3)  # every slow client connected and sending
        started = time.monotonic()
        status, listing = manage_all(
            [["status", "-f", "json", "--timeout", "10"], ["instances", "list"]],
            config_files=files,
        )
        took = time.monotonic() - started
        assert status.returncode == 0, status.stderr
        assert listing.returncode == 0, listing.stderr
        assert "TooManyConnections" not in status.stderr + listing.stderr
        assert took < 10 + SLACK
        print(f"\n80 slow clients: status and instances list answered in {took:.1f} s")
    finally:
        flood.join()
    assert flood.dropped >= 80 - 64  # the ones past the limit made room for others
    # Counted, not logged one line each: a few summary lines for 80+ drops.
    warnings = [line for line in agent.lines[before:] if "admin socket:" in line]
    assert 1 <= len(warnings) <= 10, "\n".join(warnings)
    print(f"{flood.dropped} connections dropped, {len(warnings)} log lines:", *warnings, sep="\n")
    final = manage("status", "-f", "json", config_files=files)
    assert final.returncode == 0, final.stderr
