"""Daemon conventions with a real agent process: SIGHUP, a rotated log, sd_notify, the unit.

The agent runs on ``test:///default`` and SQLite; systemd's notify socket
is a UNIX datagram socket bound by the test, read in a thread that stamps
each datagram with its arrival time.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from compute_agent.db.api import Database
from tests.functional.agent_process import REPO, AgentProcess, manage


def _conf(path, state, *, debug: bool, log_file=None):
    log_line = f"log_file = {log_file}\n" if log_file else ""
    path.write_text(
        f"[DEFAULT]\nstate_path = {state}\nhost = signal-host\nreport_interval = 1\n"
        f"periodic_fuzzy_delay = 0\ndebug = {str(debug).lower()}\n{log_line}"
        "[compute]\nstats_interval = 1\n"
    )
    return [REPO / "etc" / "compute-agent.conf", path]


def _wait_in_file(path, needle: str, timeout: float = 30, proc=None) -> str:
    end = time.monotonic() + timeout
    text = ""
    while time.monotonic() < end:
        text = path.read_text() if path.exists() else ""
        if needle in text:
            return text
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.05)
    raise AssertionError(f"{needle!r} not in {path} within {timeout} s:\n{text[-3000:]}")


def test_sighup_keeps_the_agent_running_reopens_the_log_and_reloads_the_level(tmp_path):
    log_file = tmp_path / "agent.log"
    config = _conf(tmp_path / "agent.conf", tmp_path / "state", debug=False, log_file=log_file)
    assert manage("db", "sync", config_files=config).returncode == 0
    agent = AgentProcess(config)
    try:
        _wait_in_file(log_file, "heartbeat 2", proc=agent.proc)
        assert "DEBUG" not in log_file.read_text()
        # logrotate: move the file away; the agent is then told to reopen.
        rotated = tmp_path / "agent.log.1"
        log_file.rename(rotated)
        _conf(tmp_path / "agent.conf", tmp_path / "state", debug=True, log_file=log_file)
        agent.proc.send_signal(signal.SIGHUP)
        text = _wait_in_file(log_file, "reload done: log level DEBUG", proc=agent.proc)
        assert "SIGHUP received" in text
        assert "Option DEFAULT.debug changed from [false] to [true]" in text
        _wait_in_file(log_file, "DEBUG   compute_agent.stats", proc=agent.proc)
        # Back to INFO with a second SIGHUP; the agent is still the same process.
        _conf(tmp_path / "agent.conf", tmp_path / "state", debug=False, log_file=log_file)
        agent.proc.send_signal(signal.SIGHUP)
        _wait_in_file(log_file, "reload done: log level INFO", proc=agent.proc)
        assert agent.proc.poll() is None
        old = rotated.read_text()
        assert "heartbeat 2" in old and "SIGHUP" not in old
        rc, _ = agent.terminate()
    finally:
        agent.kill()
    assert rc == 0
    text = log_file.read_text()
    assert "stop requested (SIGTERM)" in text and "compute-agent stopped" in text
    assert agent.lines == []  # everything went to the file
    tail = text[text.index("reload done: log level INFO") :]
    assert " DEBUG " not in tail.split("stop requested")[0]


class _NotifySocket:
    """systemd's side of the protocol: a bound datagram socket, read in a thread."""

    def __init__(self, path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.received: list[tuple[float, str]] = []
        self._stop = False
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            self.received.append((time.monotonic(), data.decode()))

    def messages(self, since: float = 0.0) -> list[str]:
        return [m for t, m in list(self.received) if t >= since]

    def wait_for(self, needle: str, timeout: float = 30, since: float = 0.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if any(needle in m for m in self.messages(since)):
                return
            time.sleep(0.05)
        raise AssertionError(f"{needle!r} never notified: {self.messages()[-20:]}")

    def close(self) -> None:
        self._stop = True
        self._thread.join(2)
        self.sock.close()


def test_notify_socket_gets_ready_status_watchdog_and_stopping(tmp_path):
    config = _conf(tmp_path / "agent.conf", tmp_path / "state", debug=False)
    assert manage("db", "sync", config_files=config).returncode == 0
    notify = _NotifySocket(tmp_path / "notify")
    # WatchdogSec=1: a ping every 0.5 s.
    agent = AgentProcess(config, {"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "1000000"})
    try:
        notify.wait_for("READY=1")
        ready = next(m for m in notify.messages() if "READY=1" in m).split("\n")
        assert ready[0] == "READY=1" and ready[1].startswith("STATUS=host signal-host: heartbeat")
        assert f"MAINPID={agent.proc.pid}" in ready
        notify.wait_for("STATUS=host signal-host: heartbeat 2")
        assert any(m.endswith(", RPC disabled") for m in notify.messages())
        t0 = time.monotonic()
        notify.wait_for("WATCHDOG=1", since=t0)
        # A frozen process sends nothing; thawed, it pings again.
        agent.proc.send_signal(signal.SIGSTOP)
        time.sleep(0.3)  # let a datagram already in flight land
        frozen_at = time.monotonic()
        time.sleep(3)
        assert notify.messages(since=frozen_at) == []
        agent.proc.send_signal(signal.SIGCONT)
        thawed = time.monotonic()
        notify.wait_for("WATCHDOG=1", since=thawed)
        pings = [m for m in notify.messages(since=thawed) if m == "WATCHDOG=1"]
        assert pings
        rc, _ = agent.terminate()
    finally:
        agent.kill()
        notify.close()
    assert rc == 0, agent.output
    stopping = [m for m in notify.messages() if m.startswith("STOPPING=1")]
    assert stopping == ["STOPPING=1\nSTATUS=host signal-host: stopping"]
    assert "systemd watchdog: pinging every 0.5 s" in agent.output


def test_a_refused_agent_tells_systemd_why(tmp_path):
    config = _conf(tmp_path / "agent.conf", tmp_path / "state", debug=False)
    notify = _NotifySocket(tmp_path / "notify")
    agent = AgentProcess(config, {"NOTIFY_SOCKET": notify.path})
    try:
        assert agent.proc.wait(60) == 1  # no schema
        notify.wait_for("STATUS=refused to start: database")
        assert not any("READY=1" in m for m in notify.messages())
    finally:
        agent.kill()
        notify.close()


UNIT = REPO / "etc" / "compute-agent.service"


def _verify(unit_text: str, tmp_path) -> subprocess.CompletedProcess:
    path = tmp_path / "compute-agent.service"
    path.write_text(unit_text)
    return subprocess.run(
        ["systemd-analyze", "verify", str(path)], capture_output=True, text=True, timeout=60
    )


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_the_unit_file_verifies(tmp_path):
    text = UNIT.read_text()
    for line in ("Type=notify", "WatchdogSec=", "Restart=on-failure", "ExecReload=/bin/kill -HUP"):
        assert line in text
    # The installed path does not exist here: point ExecStart at this checkout.
    here = text.replace("/usr/bin/compute-agent", f"{sys.executable} -m compute_agent.cmd.agent")
    result = _verify(here, tmp_path)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    # The check can fail: a misspelt key is reported.
    broken = _verify(here.replace("WatchdogSec=", "WatchdogSecs="), tmp_path)
    assert "Unknown key 'WatchdogSecs'" in broken.stderr


def test_a_sighup_while_the_database_is_slow_at_start_does_not_kill_the_agent(tmp_path):
    """logrotate's ``kill -HUP`` during a slow start ended the agent (SIGHUP's default action)."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(4)  # takes the connection, never answers: a database that hangs
    port = silent.getsockname()[1]
    extra = tmp_path / "db.conf"
    extra.write_text(
        f"[database]\nconnection = postgresql+pg8000://ca:ca@127.0.0.1:{port}/ca\n"
        "connect_timeout = 3\n"
    )
    config = _conf(tmp_path / "agent.conf", tmp_path / "state", debug=False) + [extra]
    agent = AgentProcess(config)
    try:
        silent.settimeout(60)
        conn, _ = silent.accept()  # the agent waits for the database now
        agent.proc.send_signal(signal.SIGHUP)
        rc = agent.proc.wait(60)
        agent._reader.join(2)
        assert rc == 1, (rc, agent.output)  # the database's error, not -SIGHUP
        assert "cannot use database" in agent.output
        conn.close()
    finally:
        agent.kill()
        silent.close()


@pytest.mark.parametrize("after", [0.1, 0.3, 0.6])
def test_a_ctrl_c_while_the_agent_starts_ends_it_without_a_traceback(tmp_path, after):
    """Before its handlers, SIGINT during the imports printed a KeyboardInterrupt traceback."""
    config = _conf(tmp_path / "agent.conf", tmp_path / "state", debug=False)
    assert manage("db", "sync", config_files=config).returncode == 0
    agent = AgentProcess(config)
    try:
        time.sleep(after)
        agent.proc.send_signal(signal.SIGINT)
        rc = agent.proc.wait(30)
        agent._reader.join(2)
    finally:
        agent.kill()
    # Killed by the signal before the handlers, or stopped by them after.
    assert rc in (-signal.SIGINT, 0), (rc, agent.output)
    assert "Traceback" not in agent.output and "KeyboardInterrupt" not in agent.output, agent.output


@pytest.mark.parametrize("after", [0.6, 1.0, 1.4, 1.8, 2.4])
def test_a_sigterm_at_any_moment_of_the_start_stops_the_agent_in_order(tmp_path, after):
    """Through the imports, the claim, each component's start and the first beats: killed
    by the signal before the handlers, or a stop in order after them; never a hang,
    a traceback or a row left claimed."""
    state = tmp_path / "state"
    config = _conf(tmp_path / "agent.conf", state, debug=False)
    assert manage("db", "sync", config_files=config).returncode == 0
    agent = AgentProcess(config)
    try:
        time.sleep(after)
        rc, took = agent.terminate(timeout=30)
    finally:
        agent.kill()
    print(f"\nSIGTERM {after} s after the start: exit {rc} after {took:.2f} s")
    assert rc in (-signal.SIGTERM, 0), (rc, agent.output)
    assert "Traceback" not in agent.output and "ERROR" not in agent.output, agent.output
    assert took < 10, (took, agent.output)
    database = Database(f"sqlite:///{state}/compute-agent.sqlite")
    try:
        row = database.service_get("signal-host", "compute-agent")
    finally:
        database.dispose()
    if rc == 0 and "stop requested" in agent.output:
        assert "compute-agent stopped in" in agent.output, agent.output
    # Never claimed, or marked stopped by the agent that claimed it.
    assert row is None or row.stopped_at is not None, (row, agent.output)
