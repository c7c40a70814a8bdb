"""Output of compute-agent-manage, in the three formats of OpenStack's cliff.

``table`` is for people (aligned, boxed columns), ``json`` for programs
(the agent's values as they are, nested), ``value`` for shell scripts
(values only, space separated, one row a line). A list of records is a
table of columns; one record is a two-column Field/Value table whose
nested values are flattened into dotted field names.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any, TextIO

from compute_agent.exception import ColumnError

FORMATS = ("table", "json", "value")


def cell(value: Any) -> str:
    """One value as a table or value cell: one line, lists and objects spelt out."""
    if isinstance(value, dict):
        text = ", ".join(f"{k}={cell(v)}" for k, v in value.items())
    elif isinstance(value, list | tuple):
        text = ", ".join(cell(v) for v in value)
    else:
        text = str(value)
    return " ".join(text.splitlines())


def flatten(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested objects as dotted fields: {"a": {"b": 1}} -> {"a.b": 1}."""
    flat: dict[str, Any] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def select(available: Sequence[str], wanted: Sequence[str] | None) -> list[str]:
    """The columns asked for with ``-c``, in the order asked; all if none."""
    if not wanted:
        return list(available)
    unknown = [c for c in wanted if c not in available]
    if unknown:
        raise ColumnError(f"unknown column {unknown[0]!r}; the columns are {', '.join(available)}")
    return list(dict.fromkeys(wanted))


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A boxed table, as prettytable draws it for the OpenStack client."""
    body = [[cell(v) for v in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in body:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    rule = "+" + "+".join("-" * (w + 2) for w in widths) + "+"

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    out = [rule, line(list(headers)), rule, *(line(r) for r in body)]
    if body:
        out.append(rule)
    return "\n".join(out) + "\n"


def emit_list(
    stream: TextIO,
    fmt: str,
    records: Sequence[dict[str, Any]],
    columns: Sequence[str],
    wanted: Sequence[str] | None = None,
) -> None:
    """Records as rows of ``columns`` (or of the ``-c`` columns asked for)."""
    cols = select(columns, wanted)
    if fmt == "json":
        stream.write(json.dumps([{c: r.get(c) for c in cols} for r in records], indent=2) + "\n")
    elif fmt == "value":
        for r in records:
            stream.write(" ".join(cell(r.get(c)) for c in cols) + "\n")
    else:
        stream.write(table(cols, [[r.get(c) for c in cols] for r in records]))


def emit_one(
    stream: TextIO, fmt: str, record: dict[str, Any], wanted: Sequence[str] | None = None
) -> None:
    """One record: Field/Value rows (flattened); json keeps it nested unless ``-c``."""
    flat = flatten(record)
    fields = select(list(flat), wanted)
    if fmt == "json":
        shown = {f: flat[f] for f in fields} if wanted else record
        stream.write(json.dumps(shown, indent=2) + "\n")
    elif fmt == "value":
        for f in fields:
            stream.write(cell(flat[f]) + "\n")
    else:
        stream.write(table(("Field", "Value"), [(f, flat[f]) for f in fields]))
