"""Taking the machine's real services away and bringing them back, as an outage would.

The commands are the ones that start them on this machine (see
``tools/setup-host.sh`` and ``tools/setup-libvirtd.sh``). Every ``stop`` or
``kill`` here has a ``start`` that waits until the service answers again,
and the tests call it in a ``finally``: a failed test must not leave the
next one without its database or broker.
"""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import time

import libvirt

from tests.functional.qemu import process_state

REPO = pathlib.Path(__file__).resolve().parents[2]


def _run(*cmd: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


def _wait(check, what: str, timeout: float) -> float:
    """Poll ``check`` until true; the seconds it took, or AssertionError."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if check():
            return time.monotonic() - t0
        time.sleep(0.1)
    raise AssertionError(f"{what} not back within {timeout} s")


# -- PostgreSQL ----------------------------------------------------------------


def _pg_version() -> str:
    return sorted(os.listdir("/etc/postgresql"))[-1]


def stop_postgresql() -> None:
    """Stop the cluster at once (``-m fast``): every open session is cut."""
    done = _run(
        "pg_ctlcluster", "--skip-systemctl-redirect", _pg_version(), "main", "stop", "-m", "fast"
    )
    assert done.returncode == 0, done.stderr


def start_postgresql(timeout: float = 60) -> float:
    _run("pg_ctlcluster", "--skip-systemctl-redirect", _pg_version(), "main", "start")
    return _wait(
        lambda: _run("pg_isready", "-h", "127.0.0.1", "-q").returncode == 0, "PostgreSQL", timeout
    )


# -- RabbitMQ ------------------------------------------------------------------


def _rabbit_up() -> bool:
    return _run("rabbitmqctl", "-q", "status", timeout=30).returncode == 0


def restart_rabbitmq(timeout: float = 90) -> tuple[float, float]:
    """Stop the whole broker node and start it again; (seconds down, seconds to start).

    A full stop, not ``stop_app``: every connection, queue and exchange that
    is not durable is gone, as after a broker host's reboot.
    """
    t0 = time.monotonic()
    stopped = _run("rabbitmqctl", "stop", timeout=60)
    assert stopped.returncode == 0, stopped.stderr
    down_at = time.monotonic()
    start_rabbitmq(timeout)
    return down_at - t0, time.monotonic() - down_at


def start_rabbitmq(timeout: float = 90) -> float:
    if _rabbit_up():
        return 0.0
    _run("rabbitmq-server", "-detached")
    return _wait(
        lambda: (
            _run("rabbitmqctl", "-q", "await_startup", "--timeout", "5", timeout=30).returncode == 0
            and _rabbit_up()
        ),
        "RabbitMQ",
        timeout,
    )


# -- libvirtd ------------------------------------------------------------------


def libvirtd_pid() -> int | None:
    try:
        pid = int(pathlib.Path("/run/libvirtd.pid").read_text().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid


def kill_libvirtd() -> int:
    """SIGKILL the daemon, as the OOM killer or a crash would; its PID.

    QEMU guests live on: they are not libvirtd's children once started.
    """
    pid = libvirtd_pid()
    assert pid is not None, "libvirtd is not running"
    os.kill(pid, signal.SIGKILL)
    _wait(lambda: not _alive(pid), "libvirtd's death", 10)
    return pid


def _alive(pid: int) -> bool:
    try:
        return process_state(pid) != "Z"  # a zombie is dead, only not yet reaped
    except OSError:
        return False


def start_libvirtd(timeout: float = 60) -> float:
    """Start it again with the project's own set-up script; seconds until it answers."""
    t0 = time.monotonic()
    done = _run(str(REPO / "tools" / "setup-libvirtd.sh"), timeout=timeout)
    assert done.returncode == 0, done.stdout + done.stderr
    conn = libvirt.open("qemu:///system")
    conn.close()
    return time.monotonic() - t0
