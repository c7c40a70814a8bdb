"""Which concurrency backend this process runs on: chosen once, before anything else loads.

:mod:`compute_agent.green` picks its implementation when it is first
imported, and oslo.messaging (imported by the config options) picks
oslo.service's backend when it is. Both come before oslo.config has read a
file, so the entry points call :func:`select_or_exit` first: it reads the
one option ``[DEFAULT] concurrency_backend`` from the config files named on
the command line (or oslo.config's default ones) with the standard library.

Precedence: ``COMPUTE_AGENT_CONCURRENCY``, then oslo.config's own variable
``OS_DEFAULT__CONCURRENCY_BACKEND``, then the files (the last one wins, as
in oslo.config), then ``eventlet``. A value the files give that is not a
backend is left for oslo.config's load to report, in its usual one line.

This module imports nothing of the agent's and nothing that starts threads.
"""

from __future__ import annotations

import configparser
import glob
import importlib.abc
import importlib.machinery
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass

# In the tree; named here too, where its callers have always found it.
from compute_agent.exception import BackendChoiceError as BackendChoiceError

VARIABLE = "COMPUTE_AGENT_CONCURRENCY"
OPTION = "concurrency_backend"
# oslo.config reads [DEFAULT] options from OS_DEFAULT__<NAME> before the files.
OSLO_VARIABLE = f"OS_DEFAULT__{OPTION.upper()}"
BACKENDS = ("eventlet", "threads")
DEFAULT = "eventlet"
PROJECT = "compute-agent"
# The modules a threads-mode process never loads.
GREEN_MODULES = ("eventlet", "greenlet")
# How long a thread may run before one waiting for the GIL asks for it
# (CPython's default is 5 ms). A thread woken by the kernel (an admin
# connection, a reply from the broker) waits for the GIL behind the busy
# ones, up to one interval per waiter ahead of it: at 1 ms the admin ping's
# p99 during a 10,000-instance sync went from 10.6 to 7.9 ms (eventlet: 8.6;
# medians of 5, docs/benchmarks.md), for 2-14 % more CPU in that sync.
THREADS_SWITCH_INTERVAL_S = 0.001


@dataclass(frozen=True)
class Choice:
    backend: str
    source: str  # where the choice came from, for the start line and ``status``


_chosen: Choice | None = None


def _checked(value: str, source: str) -> Choice:
    value = value.strip()
    if value not in BACKENDS:
        raise BackendChoiceError(f"{source}={value!r}: expected 'eventlet' or 'threads'")
    return Choice(value, source)


def _from_environment() -> Choice | None:
    for variable in (VARIABLE, OSLO_VARIABLE):
        value = os.environ.get(variable)
        if value is not None:
            return _checked(value, variable)
    return None


def chosen() -> Choice:
    """The backend of this process (the environment's or the default if none was selected)."""
    global _chosen
    if _chosen is None:
        _chosen = _from_environment() or Choice(DEFAULT, "default")
    return _chosen


def config_files(argv: Sequence[str], prog: str) -> list[str]:
    """The files oslo.config reads for ``argv``, in the order it reads them."""
    named: list[str] = []
    file_given = dir_given = False
    args = list(argv)
    for i, arg in enumerate(args):
        for flag in ("--config-file", "--config-dir"):
            if arg == flag and i + 1 < len(args):
                value = args[i + 1]
            elif arg.startswith(flag + "="):
                value = arg.split("=", 1)[1]
            else:
                continue
            if flag == "--config-file":
                file_given = True
                named.append(value)
            else:
                dir_given = True
                named.extend(sorted(glob.glob(os.path.join(glob.escape(value), "*.conf"))))
    defaults: list[str] = []
    if not (file_given and dir_given):
        from oslo_config import cfg  # imports no backend

        if not file_given:
            defaults += cfg.find_config_files(project=PROJECT, prog=prog)
        if not dir_given:
            for folder in cfg.find_config_dirs(project=PROJECT, prog=prog):
                defaults += sorted(glob.glob(os.path.join(glob.escape(folder), "*.conf")))
    return defaults + named


def from_config_files(paths: Sequence[str]) -> Choice | None:
    """``[DEFAULT] concurrency_backend`` as the files set it, or None.

    A file that cannot be read or parsed, or a value that is no backend, is
    skipped: oslo.config's load reports it in one line a moment later.
    """
    found: Choice | None = None
    for path in paths:
        parser = configparser.ConfigParser(strict=False, interpolation=None)
        try:
            with open(path, encoding="utf-8") as f:
                parser.read_file(f)
        except (OSError, UnicodeDecodeError, configparser.Error):
            continue
        value = parser.defaults().get(OPTION)
        if value is not None and value.strip() in BACKENDS:
            found = Choice(value.strip(), f"[DEFAULT] {OPTION} in {path}")
    return found


def select(argv: Sequence[str], prog: str) -> Choice:
    """Choose the backend for an entry point, before :mod:`compute_agent.green` is imported.

    Once green is imported (a test importing an entry point) its choice stands.
    """
    global _chosen
    if _chosen is not None or "compute_agent.green" in sys.modules:
        return chosen()
    _chosen = (
        _from_environment()
        or from_config_files(config_files(argv, prog))
        or Choice(DEFAULT, "default")
    )
    return _chosen


def select_or_exit(argv: Sequence[str], prog: str) -> Choice:
    """:func:`select`, or one line on stderr and exit status 2 for an unknown backend."""
    try:
        return select(argv, prog)
    except BackendChoiceError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def check_configured(value: str) -> None:
    """Refuse a loaded ``concurrency_backend`` that differs from the backend already running.

    Only a process that imported green before its entry point could read the
    files (an agent started in-process) can get here; the environment
    variable always wins, so it never conflicts.
    """
    running = chosen()
    if running.source in (VARIABLE, OSLO_VARIABLE) or value == running.backend:
        return
    raise BackendChoiceError(
        f"[DEFAULT] {OPTION} = {value}, but this process already runs on {running.backend} "
        f"({running.source}); set {VARIABLE} to choose before start"
    )


def loaded_modules() -> dict[str, bool]:
    """Whether eventlet and greenlet are loaded in this process (``status`` shows it)."""
    return {name: name in sys.modules for name in GREEN_MODULES}


class _RefuseGreenModules(importlib.abc.MetaPathFinder):
    """Make ``import eventlet`` (or greenlet) fail in a threads-mode process.

    Libraries probe for eventlet (futurist, oslo.utils) and use it when it
    imports; installed, it would load, print its deprecation notice, and
    change how they behave. A probe treats this ImportError as "absent".
    """

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname.split(".")[0] in GREEN_MODULES:
            raise ModuleNotFoundError(
                f"{fullname} is not loaded: this process runs on native threads", name=fullname
            )
        return None


def prepare_threads() -> None:
    """Set the process up for native threads; call before oslo.messaging is imported.

    eventlet and greenlet are refused from here on, and oslo.service (which
    oslo.messaging's server uses) takes its threading backend, not eventlet.
    The interpreter hands the GIL over sooner (THREADS_SWITCH_INTERVAL_S).
    """
    sys.setswitchinterval(THREADS_SWITCH_INTERVAL_S)
    if not any(isinstance(f, _RefuseGreenModules) for f in sys.meta_path):
        sys.meta_path.insert(0, _RefuseGreenModules())
    from oslo_service import backend

    backend.init_backend(backend.BackendType.THREADING)
