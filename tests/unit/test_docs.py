"""The docs and the bench suite name the same benchmarks.

Every benchmark that ``python -m bench`` knows is documented (its module
named in docs/benchmarks.md, or for a drill in docs/reliability.md), and
every benchmark the docs name exists.
"""

import ast
import pathlib
import re

REPO = pathlib.Path(__file__).resolve().parents[2]
DOCS = ("README.md", "docs/benchmarks.md", "docs/reliability.md", "docs/operations.md")


def registered() -> list[str]:
    """BENCHMARKS and ON_DEMAND of bench/__main__.py, read without importing it."""
    tree = ast.parse((REPO / "bench" / "__main__.py").read_text())
    names: list[str] = []
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.List):
            targets = {t.id for t in node.targets if isinstance(t, ast.Name)}
            if targets & {"BENCHMARKS", "ON_DEMAND"}:
                names += [ast.literal_eval(e) for e in node.value.elts]
    return names


def docs_text() -> str:
    return "\n".join((REPO / doc).read_text() for doc in DOCS)


def test_every_registered_benchmark_is_documented():
    text = docs_text()
    names = registered()
    assert len(names) >= 16
    missing = [n for n in names if f"bench/{n}.py" not in text and f"bench.{n}" not in text]
    assert missing == [], f"benchmarks with no section in the docs: {missing}"


def test_every_benchmark_the_docs_name_exists():
    text = docs_text()
    named = set(re.findall(r"python -m bench(?:\.| )([a-z_]+)", text))
    named |= set(re.findall(r"BENCH=\"?([a-z_]+)", text))
    named |= set(re.findall(r"`bench/([a-z_]+)\.py`", text))
    assert named, "no benchmark named in the docs"
    known = set(registered()) | {"common", "agent_runner", "rpc_client", "rpc_common"}
    unknown = sorted(
        n for n in named if n not in known or not (REPO / "bench" / f"{n}.py").exists()
    )
    assert unknown == [], f"the docs name benchmarks that do not exist: {unknown}"
