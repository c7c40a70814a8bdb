"""bench/ is one suite: every benchmark registered, listed with one line, and found.

Read from the files (ast), not imported: a benchmark module may patch the
process or need services at import.
"""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

BENCH = pathlib.Path(__file__).resolve().parents[2] / "bench"


def _registry() -> dict[str, object]:
    """BENCHMARKS, ON_DEMAND and HELPERS as bench/__main__.py writes them."""
    tree = ast.parse((BENCH / "__main__.py").read_text())
    found = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
            if name in ("BENCHMARKS", "ON_DEMAND", "HELPERS"):
                found[name] = ast.literal_eval(node.value)
    return found


def _has_main(path: pathlib.Path) -> bool:
    tree = ast.parse(path.read_text())
    return any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body)


def test_every_registered_benchmark_exists_with_a_main_and_a_docstring():
    registry = _registry()
    names = registry["BENCHMARKS"] + registry["ON_DEMAND"]
    assert len(names) == len(set(names))
    for name in names:
        path = BENCH / f"{name}.py"
        assert path.exists(), name
        assert _has_main(path), name
        assert ast.get_docstring(ast.parse(path.read_text())), name


def test_every_module_with_a_main_is_registered_or_a_named_helper():
    registry = _registry()
    known = set(registry["BENCHMARKS"]) | set(registry["ON_DEMAND"]) | set(registry["HELPERS"])
    runnable = {p.stem for p in BENCH.glob("*.py") if p.stem != "__main__" and _has_main(p)}
    assert runnable - known == set()
    assert set(registry["HELPERS"]) <= {p.stem for p in BENCH.glob("*.py")}


def test_list_names_every_benchmark_in_one_line_each():
    registry = _registry()
    listed = subprocess.run(
        [sys.executable, "-m", "bench", "--list"],
        capture_output=True,
        text=True,
        check=True,
        cwd=BENCH.parent,
        timeout=60,
    ).stdout.splitlines()
    assert [line.split()[0] for line in listed] == registry["BENCHMARKS"] + registry["ON_DEMAND"]
    assert all(len(line.split(maxsplit=1)) == 2 for line in listed)


def test_an_unknown_name_is_a_usage_error_in_one_line():
    run = subprocess.run(
        [sys.executable, "-m", "bench", "no_such_bench"],
        capture_output=True,
        text=True,
        cwd=BENCH.parent,
        timeout=60,
    )
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        "unknown benchmark(s): no_such_bench; see python -m bench --list"
    ]


def test_tests_import_nothing_from_bench():
    """One direction: bench uses the helpers in tests/ (load.py, nodefile, ...), never back."""
    importers = []
    for path in sorted((BENCH.parent / "tests").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            if any(n == "bench" or n.startswith("bench.") for n in names):
                importers.append(str(path.relative_to(BENCH.parent)))
    assert importers == []


def test_every_bench_module_imports():
    """A name moved out from under a benchmark (say, a helper it imports) fails here, not in a run.

    In a process of its own, patched first as ``python -m bench`` patches it.
    """
    code = (
        "from compute_agent import green\n"
        "green.monkey_patch()\n"
        "import importlib, pathlib\n"
        "names = [p.stem for p in pathlib.Path('bench').glob('*.py') if p.stem[0] != '_']\n"
        "for name in names:\n"
        "    importlib.import_module('bench.' + name)\n"
        "print(len(names))\n"
    )
    run = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", code],
        capture_output=True,
        text=True,
        cwd=BENCH.parent,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert int(run.stdout.split()[-1]) == len([p for p in BENCH.glob("*.py") if p.stem[0] != "_"])
