"""Choosing the concurrency backend: environment, config files, default; once, before green."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

from compute_agent import concurrency, green

REPO = pathlib.Path(__file__).resolve().parents[2]


def conf_file(folder: pathlib.Path, name: str, text: str) -> str:
    path = folder / name
    path.write_text(text)
    return str(path)


def test_config_files_are_read_in_oslo_config_order(tmp_path, monkeypatch):
    a = conf_file(tmp_path, "a.conf", "")
    b = conf_file(tmp_path, "b.conf", "")
    folder = tmp_path / "d"
    folder.mkdir()
    d2 = conf_file(folder, "2.conf", "")
    d1 = conf_file(folder, "1.conf", "")
    conf_file(folder, "ignored.txt", "")
    argv = ["--config-file", a, f"--config-file={b}", "--config-dir", str(folder), "db", "x"]
    assert concurrency.config_files(argv, "prog") == [a, b, d1, d2]
    # No file named: oslo.config's default ones (found here by its own search).
    from oslo_config import cfg

    monkeypatch.setattr(cfg, "find_config_files", lambda project, prog: [a])
    monkeypatch.setattr(cfg, "find_config_dirs", lambda project, prog: [str(folder)])
    assert concurrency.config_files(["status"], "prog") == [a, d1, d2]
    assert concurrency.config_files(["--config-dir", str(folder)], "prog") == [a, d1, d2]


def test_the_last_file_that_sets_the_option_wins(tmp_path):
    threads = conf_file(tmp_path, "t.conf", "[DEFAULT]\nconcurrency_backend = threads\n")
    eventlet = conf_file(tmp_path, "e.conf", "[DEFAULT]\nconcurrency_backend=eventlet\n")
    silent = conf_file(
        tmp_path, "s.conf", "[DEFAULT]\ndebug = true\n[x]\nconcurrency_backend = x\n"
    )
    bad = conf_file(tmp_path, "bad.conf", "[DEFAULT]\nconcurrency_backend = thread\n")
    broken = conf_file(tmp_path, "broken.conf", "no section at all\n")
    assert concurrency.from_config_files([eventlet, threads, silent]) == concurrency.Choice(
        "threads", f"[DEFAULT] concurrency_backend in {threads}"
    )
    assert concurrency.from_config_files([threads, eventlet]).backend == "eventlet"  # type: ignore[union-attr]
    # Left for oslo.config's load to report in one line: a bad value, a broken or missing file.
    assert concurrency.from_config_files([bad, broken, str(tmp_path / "none.conf")]) is None
    assert concurrency.from_config_files([threads, bad]).backend == "threads"  # type: ignore[union-attr]


def test_a_loaded_value_must_match_the_running_backend(monkeypatch):
    other = "threads" if green.BACKEND == "eventlet" else "eventlet"
    monkeypatch.setattr(concurrency, "_chosen", concurrency.Choice(green.BACKEND, "default"))
    concurrency.check_configured(green.BACKEND)
    with pytest.raises(concurrency.BackendChoiceError, match=f"already runs on {green.BACKEND}"):
        concurrency.check_configured(other)
    # The environment variable outranks the files: no conflict.
    chosen = concurrency.Choice(green.BACKEND, concurrency.VARIABLE)
    monkeypatch.setattr(concurrency, "_chosen", chosen)
    concurrency.check_configured(other)


def test_the_green_modules_loaded_are_those_of_the_backend():
    on_eventlet = green.BACKEND == "eventlet"
    assert concurrency.loaded_modules() == {"eventlet": on_eventlet, "greenlet": on_eventlet}


def test_a_threads_process_hands_the_gil_over_sooner_and_eventlet_keeps_the_default():
    """Checked in a fresh interpreter: a test may change the interval for a while."""
    probe = (
        "import sys; from compute_agent import green; print(green.BACKEND, sys.getswitchinterval())"
    )
    for backend, interval in (
        ("threads", concurrency.THREADS_SWITCH_INTERVAL_S),
        ("eventlet", 0.005),
    ):
        done = subprocess.run(
            [sys.executable, "-c", probe],
            capture_output=True,
            text=True,
            cwd=REPO,
            env={**os.environ, concurrency.VARIABLE: backend},
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == [backend, str(interval)], done.stdout


SELECT = """
import sys
from compute_agent import concurrency
choice = concurrency.select(sys.argv[1:], "compute-agent")
from compute_agent import green
import oslo_messaging, futurist  # libraries that probe for eventlet
from oslo_service import backend
print(green.BACKEND, backend.get_backend_type().value, choice.source,
      sorted(m for m in sys.modules if m.split(".")[0] in ("eventlet", "greenlet")) == [])
"""


def select(env: dict[str, str], *argv: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in (concurrency.VARIABLE,)}
    return subprocess.run(
        [sys.executable, "-c", SELECT, *argv],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**clean, **env},
        timeout=120,
    )


def test_an_entry_point_chooses_by_environment_then_files_then_default(tmp_path):
    threads = conf_file(tmp_path, "t.conf", "[DEFAULT]\nconcurrency_backend = threads\n")
    eventlet = conf_file(tmp_path, "e.conf", "[DEFAULT]\nconcurrency_backend = eventlet\n")
    empty = conf_file(tmp_path, "empty.conf", "[DEFAULT]\n")
    by_file = select({}, "--config-file", threads)
    assert by_file.stdout.split() == [
        "threads", "threading", "[DEFAULT]", "concurrency_backend", "in", threads, "True",
    ], by_file.stderr  # fmt: skip
    # Nothing on stderr: no eventlet deprecation notice, no warning of oslo's.
    assert by_file.stderr == ""
    by_env = select({concurrency.VARIABLE: "eventlet"}, "--config-file", threads)
    assert by_env.stdout.split() == ["eventlet", "eventlet", concurrency.VARIABLE, "False"]
    by_oslo_env = select({concurrency.OSLO_VARIABLE: "threads"}, "--config-file", eventlet)
    assert by_oslo_env.stdout.split()[:3] == ["threads", "threading", concurrency.OSLO_VARIABLE]
    default = select({}, "--config-file", empty)
    assert default.stdout.split() == ["eventlet", "eventlet", "default", "False"]


@pytest.mark.parametrize(
    ("env", "conf", "message"),
    [
        (
            {concurrency.VARIABLE: "thread"},
            "",
            "compute-agent-manage: error: COMPUTE_AGENT_CONCURRENCY='thread': "
            "expected 'eventlet' or 'threads'",
        ),
        (
            {},
            "[DEFAULT]\nconcurrency_backend = green\n",
            "compute-agent-manage: error: Value for option concurrency_backend in {path} is not "
            "valid: Valid values are [eventlet, threads], but found 'green'",
        ),
    ],
)
def test_an_unknown_backend_is_one_line_and_exit_2(tmp_path, env, conf, message):
    path = conf_file(tmp_path, "c.conf", f"[DEFAULT]\nstate_path = {tmp_path}\n" + conf)
    clean = {k: v for k, v in os.environ.items() if k != concurrency.VARIABLE}
    done = subprocess.run(
        [sys.executable, "-m", "compute_agent.cmd.manage", "--config-file", path, "db", "version"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**clean, **env},
        timeout=120,
    )
    assert (done.returncode, done.stderr) == (2, message.format(path=path) + "\n")
