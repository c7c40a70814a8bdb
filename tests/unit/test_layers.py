"""Layers point one way: the scheduler's client loads none of the server, nothing imports cmd."""

from __future__ import annotations

import ast
import json
import pathlib
import subprocess
import sys

import compute_agent

PACKAGE = pathlib.Path(compute_agent.__file__).parent

# What the client must never pull in: the server's stack and its database.
SERVER_SIDE = (
    "sqlalchemy",
    "compute_agent.service",
    "compute_agent.db",
    "compute_agent.green",
    "compute_agent.periodic",
    "compute_agent.hub_monitor",
    "compute_agent.manager",
)


def _loaded(code: str) -> dict[str, object]:
    """Run ``code`` in a fresh interpreter; what it loaded, and whether eventlet patched it."""
    probe = (
        f"{code}\nimport json, sys\n"
        "patched = 'eventlet.patcher' in sys.modules and "
        "sys.modules['eventlet.patcher'].is_monkey_patched('socket')\n"
        "print(json.dumps({'modules': sorted(sys.modules), 'patched': patched}))"
    )
    out = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", probe],
        capture_output=True,
        text=True,
        check=True,
        cwd=PACKAGE.parent,
        timeout=60,
    ).stdout
    return json.loads(out.splitlines()[-1])


def test_rpcapi_loads_neither_the_server_nor_the_database():
    loaded = _loaded("import compute_agent.rpcapi")
    modules = set(loaded["modules"])
    assert not [m for m in SERVER_SIDE if m in modules]
    assert "compute_agent.rpcapi" in modules
    assert not loaded["patched"]


def test_rpcapi_loads_eventlet_only_if_oslo_messaging_itself_does():
    """oslo.messaging 18.x imports oslo_service.service, whose default backend is eventlet.

    So eventlet is loaded (never patched) in any process that imports
    oslo.messaging; the agent's own modules must add no import of it.
    """
    ours = set(_loaded("import compute_agent.rpcapi")["modules"])
    if "eventlet" in set(_loaded("import oslo_messaging")["modules"]):
        assert "compute_agent.green" not in ours
    else:
        assert "eventlet" not in ours


def _imports(path: pathlib.Path) -> set[str]:
    """The absolute module names ``path`` imports (``from a import b`` gives a and a.b)."""
    names: set[str] = set()
    tree = ast.parse(path.read_text(), str(path))
    # Imports under ``if TYPE_CHECKING:`` are for the type checker only: not followed.
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            node.body = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _module(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _importers_of(target: str, *, outside: str | None = None) -> list[str]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = _module(path)
        if outside and (name == outside or name.startswith(outside + ".")):
            continue
        if any(i == target or i.startswith(target + ".") for i in _imports(path)):
            found.append(name)
    return found


def test_only_the_entry_points_import_the_entry_points():
    assert _importers_of("compute_agent.cmd", outside="compute_agent.cmd") == []


def test_the_background_jobs_do_not_import_the_operations():
    importers = _importers_of("compute_agent.operations")
    assert "compute_agent.recovery" not in importers
    assert "compute_agent.reaper" not in importers


def test_only_the_entry_points_import_the_config_loader():
    importers = _importers_of("compute_agent.conf.loader", outside="compute_agent.conf")
    assert importers and all(n.startswith("compute_agent.cmd.") for n in importers)


# The layers, lowest first (docs/architecture.md, "Layers and imports"). A module imports only
# modules of its own layer or below; the client (rpcapi) only what it needs.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    (
        "base",
        (
            "exception",
            "states",
            "utils",
            "concurrency",
            "green",
            "_green_eventlet",
            "_green_threads",
            "log",
            "counters",
            "metrics.registry",
            "metrics.instances",
        ),
    ),
    ("resources", ("conf", "db", "virt", "rpc", "rpc.transport", "ownership", "sdnotify")),
    (
        "work",
        (
            "locks",
            "steady",
            "sync_policy",
            "guest_ops",
            "intake",
            "operations",
            "power_sync",
            "lifecycle",
            "recovery",
            "reaper",
            "retention",
            "resume",
            "stats",
            "periodic",
            "hub_monitor",
            "servicegroup",
        ),
    ),
    ("node", ("service", "manager")),
    ("front doors", ("dispatch", "rpc.server", "admin", "metrics.collector", "metrics.server")),
    ("entry points", ("cmd",)),
]
CLIENT = ("rpcapi", ("exception", "rpc", "rpc.transport", "utils"))


def _layer_of(module: str) -> int:
    """The index in LAYERS of ``module`` (a name under compute_agent), by its longest prefix."""
    best, found = -1, None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, found = len(prefix), index
    assert found is not None, (
        f"compute_agent.{module} has no layer: add it to LAYERS and docs/architecture.md"
    )
    return found


def _own_imports(path: pathlib.Path) -> set[str]:
    """The compute_agent modules ``path`` imports, without the package prefix."""
    found = set()
    for name in _imports(path):
        if name.startswith("compute_agent."):
            short = name.removeprefix("compute_agent.")
            # ``from compute_agent.x import Name`` also yields x.Name; keep real modules.
            if (PACKAGE / short.replace(".", "/")).with_suffix(".py").exists() or (
                PACKAGE / short.replace(".", "/")
            ).is_dir():
                found.add(short)
    # ``from compute_agent.metrics import registry`` names the package too: keep the module.
    return {m for m in found if not any(o.startswith(m + ".") for o in found)}


def test_every_import_points_down_the_layers():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module(path).removeprefix("compute_agent").lstrip(".")
        if not module or "migrations" in path.parts or path.name == "__init__.py":
            continue
        if module == CLIENT[0]:
            extra = _own_imports(path) - set(CLIENT[1])
            assert not extra, f"the client rpcapi imports {sorted(extra)}"
            continue
        mine = _layer_of(module)
        for target in _own_imports(path):
            if _layer_of(target) > mine:
                upward.append(f"{module} ({LAYERS[mine][0]}) -> {target}")
    assert upward == []


def test_the_power_sync_and_the_event_handler_meet_through_named_protocols():
    """They call each other, each through a protocol it is given when built.

    The event handler imports the sync's module (it drives ``sync_one`` and
    implements ``Rechecks``); the sync imports neither the handler nor the
    manager, which routes re-checks to the handler while events are on.
    """
    from compute_agent.lifecycle import LifecycleHandler
    from compute_agent.manager import ComputeManager
    from compute_agent.power_sync import PowerSync, Rechecks

    assert "power_sync" in _own_imports(PACKAGE / "lifecycle.py")
    assert not {"lifecycle", "manager"} & _own_imports(PACKAGE / "power_sync.py")
    for implementer in (LifecycleHandler, ComputeManager, PowerSync):
        assert Rechecks in implementer.__mro__, implementer


# State that one object sets on another it was given, by design (not a collaborator):
# a summary or a record the setter owns, an ORM row, a stdlib object.
STATE_SET_ELSEWHERE = {
    "manager.py": {"self.service.disabled"},
    "rpc/server.py": {"self._service.exit_status"},
    "service.py": {"self.row.report_count"},
    "db/api.py": {"self._in_native.active"},
    "power_sync.py": {"call.summary.aborted"},
}


def test_no_component_is_wired_after_it_is_built():
    """Collaborators arrive through constructors: nothing sets an attribute of a
    component it holds (``self.x.y = ...``, as ``power_sync.recheck_later =``
    once was), nor sets itself into what it was given (``dispatcher.admin_socket = self``)."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = str(path.relative_to(PACKAGE))
        tree = ast.parse(path.read_text(), rel)
        params = {
            a.arg
            for node in ast.walk(tree)
            if isinstance(node, ast.FunctionDef) and node.name == "__init__"
            for a in node.args.args + node.args.kwonlyargs
            if a.arg != "self"
        }
        for node in ast.walk(tree):
            targets = node.targets if isinstance(node, ast.Assign) else []
            if isinstance(node, (ast.AnnAssign, ast.AugAssign)):
                targets = [node.target]
            for target in targets:
                for t in target.elts if isinstance(target, ast.Tuple) else [target]:
                    if not isinstance(t, ast.Attribute):
                        continue
                    base = t.value
                    on_held = isinstance(base, ast.Attribute) and ast.unparse(base).startswith(
                        "self."
                    )
                    on_given = isinstance(base, ast.Name) and base.id in params
                    text = ast.unparse(t)
                    if (on_held or on_given) and text not in STATE_SET_ELSEWHERE.get(rel, ()):
                        found.append(f"{rel}:{node.lineno}: {text} = ...")
    assert found == []
