"""Run the real ``compute-agent`` as a subprocess, as an operator would."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import threading
import time

REPO = pathlib.Path(__file__).resolve().parents[2]


class AgentProcess:
    """A running agent whose stderr is collected line by line."""

    def __init__(
        self,
        config_files: list[pathlib.Path],
        extra_env: dict | None = None,
        metrics_port: int | None = 0,
        drop_env: tuple[str, ...] = (),
    ) -> None:
        """``metrics_port``: [metrics] listen_port, given in a last config file.

        0 (the default) turns the endpoint off, so agents of parallel tests
        never fight for the default port; None leaves the config files' own.
        """
        args = [sys.executable, "-m", "compute_agent.cmd.agent"]
        files = list(config_files)
        if metrics_port is not None:
            files.append(metrics_config(metrics_port))
        for path in files:
            args += ["--config-file", str(path)]
        env = dict(os.environ, PYTHONUNBUFFERED="1", **(extra_env or {}))
        for name in drop_env:
            env.pop(name, None)
        self.proc = subprocess.Popen(
            args,
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
            env=env,
            cwd=REPO,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, needle: str, timeout: float = 30) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if any(needle in line for line in self.lines):
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"{needle!r} not logged within {timeout} s:\n{self.output}")

    def terminate(self, sig: int = signal.SIGTERM, timeout: float = 10) -> tuple[int, float]:
        t0 = time.monotonic()
        self.proc.send_signal(sig)
        rc = self.proc.wait(timeout)
        elapsed = time.monotonic() - t0
        self._reader.join(2)
        return rc, elapsed

    def wait_exit(self, timeout: float = 10) -> int:
        """Wait for the process to end (after a signal sent by the caller); its exit status.

        Lets a test signal several agents first and wait for them together.
        """
        rc = self.proc.wait(timeout)
        self._reader.join(2)
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def metrics_config(port: int) -> pathlib.Path:
    """A config file that only sets ``[metrics] listen_port``."""
    path = pathlib.Path(tempfile.gettempdir()) / f"ca-test-metrics-port-{port}.conf"
    if not path.exists():
        path.write_text(f"[metrics]\nlisten_port = {port}\n")
    return path


def free_port() -> int:
    """A TCP port nobody listens on now (the caller binds it soon after)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def synced_config(
    root: pathlib.Path, host: str, *, default: str = "", rest: str = "", head: str = ""
) -> list[pathlib.Path]:
    """The repo's config then this test's, its database synced.

    The test's file gives the agent ``root/state`` and ``host``, no start-up
    fuzz, then ``default`` (more [DEFAULT] lines) and ``rest`` (other
    sections); ``head`` goes first (a broker's settings, say).
    """
    path = root / f"{host}.conf"
    path.write_text(
        f"{head}[DEFAULT]\nstate_path = {root}/state\nhost = {host}\n"
        f"periodic_fuzzy_delay = 0\n{default}{rest}"
    )
    files = [REPO / "etc" / "compute-agent.conf", path]
    synced = manage("db", "sync", config_files=files)
    assert synced.returncode == 0, synced.stderr
    return files


def manage(*args: str, config_files: list[pathlib.Path]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "compute_agent.cmd.manage"]
    for path in config_files:
        cmd += ["--config-file", str(path)]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=120, cwd=REPO)


def manage_all(
    commands: list[list[str]], config_files: list[pathlib.Path], timeout: float = 120
) -> list[subprocess.CompletedProcess]:
    """Run several independent ``compute-agent-manage`` commands at once.

    Each CLI process spends most of its second importing; running a batch
    side by side keeps a test that checks many commands fast.
    """
    base = [sys.executable, "-m", "compute_agent.cmd.manage"]
    for path in config_files:
        base += ["--config-file", str(path)]
    procs = [
        subprocess.Popen(
            [*base, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            cwd=REPO,
        )
        for args in commands
    ]
    done = []
    for args, proc in zip(commands, procs, strict=True):
        out, err = proc.communicate(timeout=timeout)
        done.append(subprocess.CompletedProcess(args, proc.returncode, out, err))
    return done


def manage_on_terminal(
    *args: str, config_files: list[pathlib.Path], timeout: float = 120
) -> tuple[subprocess.CompletedProcess, str]:
    """Run ``compute-agent-manage`` with its stderr on a pseudo-terminal, as a person would.

    Returns the finished process (stdout captured) and what it wrote to the terminal.
    """
    import pty

    cmd = [sys.executable, "-m", "compute_agent.cmd.manage"]
    for path in config_files:
        cmd += ["--config-file", str(path)]
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(
            [*cmd, *args],
            stdout=subprocess.PIPE,
            stderr=slave,
            stdin=subprocess.DEVNULL,
            text=True,
            cwd=REPO,
        )
        os.close(slave)
        slave = -1
        out, _ = proc.communicate(timeout=timeout)
        terminal = b""
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the other end is closed and drained
                break
            if not chunk:
                break
            terminal += chunk
    finally:
        if slave >= 0:
            os.close(slave)
        os.close(master)
    return (
        subprocess.CompletedProcess(args, proc.returncode, out, ""),
        terminal.decode("utf-8", "replace"),
    )


# Runs the CLI as its entry point does, then records which green modules it loaded.
_CLI_THEN_MODULES = """
import json, runpy, sys
out, sys.argv = sys.argv[1], ["compute-agent-manage", *sys.argv[2:]]
try:
    runpy.run_module("compute_agent.cmd.manage", run_name="__main__", alter_sys=True)
finally:
    with open(out, "w") as f:
        json.dump(sorted(m for m in sys.modules if m.split(".")[0] in ("eventlet", "greenlet")), f)
"""


def manage_loaded(
    *args: str,
    config_files: list[pathlib.Path],
    drop_env: tuple[str, ...] = (),
    extra_env: dict[str, str] | None = None,
) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run ``compute-agent-manage``; also return the eventlet/greenlet modules it had loaded."""
    import json

    with tempfile.NamedTemporaryFile("r", suffix=".json") as record:
        cmd = [sys.executable, "-c", _CLI_THEN_MODULES, record.name]
        for path in config_files:
            cmd += ["--config-file", str(path)]
        env = {k: v for k, v in os.environ.items() if k not in drop_env}
        env.update(extra_env or {})
        done = subprocess.run(
            [*cmd, *args], capture_output=True, text=True, timeout=120, cwd=REPO, env=env
        )
        return done, json.load(record)
