"""Dead rows by the hundred thousand, fast: what bench/db_scale.py and the plan tests load.

Soft-deleted instances of one host and their audit rows, written by
``INSERT ... SELECT`` over a series the database makes itself (SQLite and
PostgreSQL), in chunks. Here, where bench and tests both import it.
"""

from __future__ import annotations

import datetime as dt
import sys
import time
from typing import Any

import sqlalchemy as sa

from compute_agent.db.api import Database
from compute_agent.utils import utcnow

HOST = "bench-host"  # the host the benchmarks use (bench.common.HOST)
CHUNK = 200_000  # rows per INSERT ... SELECT

_DEAD_UUID = {
    "sqlite": "printf('%08x-dead-4000-8000-%012x', {x}, {x})",
    "postgresql": "lpad(to_hex({x}), 8, '0') || '-dead-4000-8000-' || lpad(to_hex({x}), 12, '0')",
}
_SERIES = {
    "sqlite": "(WITH RECURSIVE s(x) AS (SELECT :a UNION ALL SELECT x + 1 FROM s WHERE x < :b) "
    "SELECT x FROM s) AS s",
    "postgresql": "generate_series(CAST(:a AS bigint), CAST(:b AS bigint)) AS s(x)",
}


def dead_uuid(i: int) -> str:
    return f"{i:08x}-dead-4000-8000-{i:012x}"


def _params(text: str) -> Any:
    """The statement, its time and boolean bound as each dialect stores them."""
    types = {"old": sa.DateTime(), "dead": sa.Boolean()}
    return sa.text(text).bindparams(
        *(sa.bindparam(name, type_=kind) for name, kind in types.items() if f":{name}" in text)
    )


def add_dead(db: Database, backend: str, dead: int, actions: int, first: int = 1) -> float:
    """``dead`` soft-deleted instances of HOST (numbered from ``first``) and ``actions``
    audit rows of theirs; seconds."""
    started = time.perf_counter()
    old = utcnow() - dt.timedelta(days=60)
    uuid = _DEAD_UUID[backend]
    series = _SERIES[backend]
    insert_instances = _params(
        "INSERT INTO instances (uuid, host, display_name, domain_name, vm_state, task_state, "
        "power_state, vcpus, memory_mb, created_at, updated_at, deleted_at, deleted) "
        f"SELECT {uuid.format(x='x')}, :host, 'dead', 'instance-' || {uuid.format(x='x')}, "
        f"'deleted', NULL, 'nostate', 1, 64, :old, :old, :old, :dead FROM {series}"
    )
    per = max(1, actions // max(1, dead))
    y = "((x - :first) / :per + :first)"  # grouped by instance: the index grows in order
    insert_actions = _params(
        "INSERT INTO instance_actions (instance_uuid, action, field, old_value, new_value, "
        "reason, source, created_at) "
        f"SELECT {uuid.format(x=y)}, 'power_sync', 'power_state', 'running', 'shutdown', "
        f"'bench', 'sync', :old FROM {series}"
    )
    for statement, total, extra in (
        (insert_instances, dead, {"host": HOST, "dead": True}),
        (insert_actions, actions, {"per": per, "first": first}),
    ):
        for a in range(first, first + total, CHUNK):
            b = min(first + total - 1, a + CHUNK - 1)
            with db.engine.begin() as conn:
                conn.execute(statement, {"a": a, "b": b, "old": old, **extra})
            print(f"  {b - first + 1:,}/{total:,} rows", end="\r", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    with db.engine.begin() as conn:
        conn.execute(sa.text("ANALYZE"))
    return time.perf_counter() - started
