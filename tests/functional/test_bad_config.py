"""Bad configuration: ``compute-agent`` and ``compute-agent-manage`` refuse it in one line.

Each case is a config file an operator could plausibly write (or a path
that is not a readable file). The real entry points run as processes, as
an operator runs them, and must exit non-zero with exactly one line on
stderr that names the file or the option and says what is wrong: no
traceback, and never the password of a URL. The unit tests of the loader
(``tests/unit/test_config.py``) check the messages of a few values; this
checks what the processes print, for every kind of mistake.
"""

from __future__ import annotations

import pathlib
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.functional.agent_process import REPO

SECRET = "hunter2-s3cret"
# Processes started at once: each spends most of a second importing.
BATCH = 6
TIMEOUT = 60


@dataclass(frozen=True)
class Case:
    id: str
    text: str | None  # the config file's text; None: ``path`` is used as it is
    needles: tuple[str, ...]  # what the one line must say; {file} is the file's path
    status: int = 2
    path: str | None = None
    manage: bool = True  # compute-agent-manage status loads the same config


CASES = [
    Case("syntax-section", "[DEFAULT\nhost = x\n", ("{file}", "malformed", "Invalid section")),
    Case("syntax-no-equals", "[DEFAULT]\nthis line is no option\n", ("{file}:2", "malformed")),
    Case("syntax-continuation", "  indented = first\n", ("{file}:1", "malformed")),
    Case("not-utf8", "[DEFAULT]\nhost = caf\udce9\n", ("{file}", "not UTF-8")),
    Case("missing-file", None, ("config file not found", "{file}"), path="{tmp}/absent.conf"),
    Case("directory", None, ("{file}", "cannot be read", "Is a directory"), path="{tmp}"),
    # Root reads any mode-000 file; /proc/self/mem is one nobody can read as text.
    Case("unreadable", None, ("/proc/self/mem", "cannot be read"), path="/proc/self/mem"),
    Case("int-not-a-number", "[DEFAULT]\nreport_interval = often\n", ("report_interval", "{file}")),
    Case(
        "float-not-a-number",
        "[libvirt]\nlifecycle_event_delay = soon\n",
        ("lifecycle_event_delay",),
    ),
    Case("int-below-range", "[DEFAULT]\nreport_interval = 0\n", ("report_interval", "greater")),
    Case(
        "int-above-range",
        "[compute]\nsync_power_state_concurrency = 5000\n",
        ("sync_power_state_concurrency", "less than or equal to 1000"),
    ),
    Case("negative-interval", "[DEFAULT]\nreport_interval = -5\n", ("report_interval", "{file}")),
    Case("negative-delay", "[libvirt]\nlifecycle_event_delay = -1\n", ("lifecycle_event_delay",)),
    Case("negative-timeout", "[DEFAULT]\ngraceful_shutdown_timeout = -3\n", ("graceful_shutdown",)),
    Case(
        "invalid-choice", "[compute]\npower_sync_source = magic\n", ("power_sync_source", "magic")
    ),
    Case("invalid-driver", "[DEFAULT]\ncompute_driver = xen\n", ("compute_driver", "xen")),
    Case("invalid-virt-type", "[libvirt]\nvirt_type = xen\n", ("virt_type", "xen")),
    Case("invalid-bool", "[DEFAULT]\ndebug = maybe\n", ("debug", "maybe")),
    Case(
        "template-without-uuid",
        "[compute]\ninstance_name_template = vm\n",
        ("instance_name_template", "%(uuid)s"),
    ),
    Case(
        "template-injection",
        "[compute]\ninstance_name_template = %(uuid)s</name><devices/>\n",
        ("instance_name_template", "not a valid domain name"),
    ),
    Case(
        "template-format",
        "[compute]\ninstance_name_template = vm-%(uuid)d\n",
        ("instance_name_template", "not a valid template"),
    ),
    Case(
        "admin-socket-too-long", "[DEFAULT]\nadmin_socket = /" + "s" * 120 + "\n", ("admin_socket",)
    ),
    Case(
        "log-file-directory-missing",
        "[DEFAULT]\nlog_file = /nonexistent/compute-agent/agent.log\n",
        ("log_file", "/nonexistent/compute-agent/agent.log", "No such file"),
    ),
    # The database and the transport are the agent's own: status uses neither.
    Case(
        "database-url-garbage",
        f"[database]\nconnection = not a url {SECRET}\n",
        ("[database] connection", "invalid database URL"),
        manage=False,
    ),
    Case(
        "database-url-dialect",
        f"[database]\nconnection = nosuchdb://admin:{SECRET}@db/nova\n",
        ("[database] connection", "nosuchdb"),
        manage=False,
    ),
    Case(
        "database-url-port",
        f"[database]\nconnection = postgresql://admin:{SECRET}@db:port/nova\n",
        ("[database] connection", "invalid database URL"),
        manage=False,
    ),
    Case(
        "database-url-driver",
        f"[database]\nconnection = postgresql+nodriver://admin:{SECRET}@db/nova\n",
        ("[database] connection", "postgresql.nodriver"),
        manage=False,
    ),
    Case(
        "transport-url-garbage",
        "[DEFAULT]\ntransport_url = not a url\n",
        ("transport_url", "No scheme"),
        manage=False,
    ),
    Case(
        "transport-url-driver",
        f"[DEFAULT]\ntransport_url = nosuch://guest:{SECRET}@broker:5672/\n",
        ("transport_url", "nosuch://guest:***@broker", "nosuch"),
        manage=False,
    ),
    Case(
        "transport-url-port",
        f"[DEFAULT]\ntransport_url = rabbit://guest:{SECRET}@broker:port/\n",
        ("transport_url", "rabbit://guest:***@broker:port/"),
        manage=False,
    ),
    Case(
        "transport-url-port-range",
        f"[DEFAULT]\ntransport_url = rabbit://guest:{SECRET}@broker:99999/\n",
        ("transport_url", "port 99999 is out of range"),
        manage=False,
    ),
    Case(
        "state-path-impossible",
        "[DEFAULT]\nstate_path = /proc/compute-agent\n",
        ("state_path", "/proc/compute-agent"),
        status=1,
        manage=False,
    ),
]


@dataclass
class Run:
    case: Case
    file: str
    prog: str
    proc: subprocess.CompletedProcess


def _config_path(case: Case, tmp: pathlib.Path) -> str:
    """Write the case's file (state under ``tmp``, so no two runs share a socket)."""
    if case.text is None:
        assert case.path is not None
        return case.path.format(tmp=tmp)
    path = tmp / "agent.conf"
    text = case.text
    if "state_path" not in text:
        text += f"[DEFAULT]\nstate_path = {tmp}/state\n"  # after: line numbers stay
    path.write_bytes(text.encode("utf-8", "surrogateescape"))
    return str(path)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Iterator[dict[tuple[str, str], Run]]:
    """Every case through both entry points, BATCH processes at a time."""
    jobs = []
    for case in CASES:
        tmp = tmp_path_factory.mktemp(case.id)
        file = _config_path(case, tmp)
        jobs.append((case, file, "compute-agent", ["compute_agent.cmd.agent"]))
        if case.manage:
            jobs.append((case, file, "compute-agent-manage", ["compute_agent.cmd.manage"]))
    done: dict[tuple[str, str], Run] = {}
    for start in range(0, len(jobs), BATCH):
        started = []
        for case, file, prog, module in jobs[start : start + BATCH]:
            argv = [sys.executable, "-m", *module, "--config-file", file]
            if prog == "compute-agent-manage":
                argv.append("status")
            started.append(
                (
                    case,
                    file,
                    prog,
                    subprocess.Popen(
                        argv,
                        stdin=subprocess.DEVNULL,
                        stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE,
                        text=True,
                        errors="backslashreplace",
                        cwd=REPO,
                    ),
                )
            )
        for case, file, prog, popen in started:
            try:
                out, err = popen.communicate(timeout=TIMEOUT)
            except subprocess.TimeoutExpired:
                popen.kill()  # it started, on a config it should have refused
                out, err = popen.communicate()
            result = subprocess.CompletedProcess(popen.args, popen.returncode, out, err)
            done[(case.id, prog)] = Run(case, file, prog, result)
    yield done


PAIRS = [(c.id, "compute-agent") for c in CASES] + [
    (c.id, "compute-agent-manage") for c in CASES if c.manage
]


@pytest.mark.parametrize("case_id,prog", PAIRS, ids=[f"{p}:{c}" for c, p in PAIRS])
def test_bad_config_is_one_line_naming_the_problem(runs, case_id, prog):
    run = runs[(case_id, prog)]
    proc, case = run.proc, run.case
    lines = proc.stderr.splitlines()
    assert proc.returncode == case.status, proc.stderr
    assert len(lines) == 1, proc.stderr
    line = lines[0]
    assert line.startswith(f"{prog}: error: "), line
    for needle in case.needles:
        assert needle.format(file=run.file) in line, line
    assert "Traceback" not in proc.stderr
    assert SECRET not in proc.stderr and SECRET not in proc.stdout
    assert proc.stdout == ""
    assert len(line) < 400, line


def test_every_case_has_a_distinct_file_or_value():
    """Guard against two cases silently testing the same thing."""
    keys = [(c.text, c.path) for c in CASES]
    assert len(set(keys)) == len(keys)
    assert len({c.id for c in CASES}) == len(CASES)
