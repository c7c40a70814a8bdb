"""The hot queries use an index, never a scan of the dead rows, once a database holds many.

The agent's own statements are captured as it runs them and handed back to
the server's EXPLAIN with their parameters, after ANALYZE has seen 500
dead rows for each live one: the planner's choice, not a timing, is what is
checked (bench/db_scale.py measures the time).
"""

from __future__ import annotations

import uuid as uuidlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import event

from compute_agent.db import purge
from compute_agent.utils import utcnow
from tests.conftest import backend_params
from tests.dead_rows import add_dead, dead_uuid
from tests.helpers import bulk_create_instances

HOST = "bench-host"  # the host add_dead writes
LIVE = 1000
# Dead rows per backend: PostgreSQL's planner rightly reads a table of a few
# thousand rows whole; SQLite went wrong at 10,000 (walking the host's dead
# rows in id order for the reaper) and right again at 100,000.
DEAD = {"sqlite": 10_000, "postgresql": 100_000}


@pytest.fixture(params=backend_params("sqlite", "postgresql"))
def big(request, db_url_factory) -> Iterator[Any]:
    from compute_agent.db import migration
    from compute_agent.db.api import Database

    db = Database(db_url_factory(request.param))
    migration.upgrade(db)
    bulk_create_instances(
        db,
        [
            {"uuid": str(uuidlib.uuid4()), "host": HOST, "vm_state": "active",
             "power_state": "running"}
            for _ in range(LIVE)
        ],
    )  # fmt: skip
    add_dead(db, request.param, DEAD[request.param], DEAD[request.param])  # ANALYZEd
    yield request.param, db
    db.dispose()


def statements(db: Any, call: Callable[[], Any]) -> list[tuple[str, Any]]:
    """The SELECTs ``call`` sent, with their parameters."""
    seen: list[tuple[str, Any]] = []

    def capture(conn, cursor, statement, parameters, context, many):
        if statement.lstrip().upper().startswith("SELECT") and "instance" in statement:
            seen.append((statement, parameters))

    event.listen(db.engine, "before_cursor_execute", capture)
    try:
        call()
    finally:
        event.remove(db.engine, "before_cursor_execute", capture)
    assert seen
    return seen


def plan(db: Any, backend: str, statement: str, parameters: Any) -> str:
    prefix = "EXPLAIN QUERY PLAN " if backend == "sqlite" else "EXPLAIN "
    with db.engine.connect() as conn:
        rows = conn.exec_driver_sql(prefix + statement, parameters).all()
    return "\n".join(" ".join(str(c) for c in row) for row in rows)


def test_the_hot_queries_use_an_index(big):
    backend, db = big
    live = db.instance_get_all_by_host(HOST)
    names = [f"instance-{dead_uuid(i)}" for i in range(1, 21)] + [i.domain_name for i in live]
    calls = {
        "live instances": lambda: db.instance_get_all_by_host(HOST),
        "counts (status)": lambda: db.instance_counts(HOST),
        "one instance": lambda: db.instance_get(live[0].uuid, host=HOST),
        "reaper look-up": lambda: db.instance_get_deleted_by_domain_names(HOST, names),
        "audit trail": lambda: db.actions_get(dead_uuid(7)),
        "purge pick": lambda: purge.Purger(db, host=HOST)._dead_instances(utcnow(), 0, 100),
        "purge trail": lambda: purge.Purger(db)._actions_of([dead_uuid(9)], None, 100),
    }
    # Where a range of the index is not enough: the condition that makes it short.
    must = {
        "reaper look-up": "domain_name=?" if backend == "sqlite" else "domain_name)::text = ANY",
        "audit trail": "instance_uuid=?" if backend == "sqlite" else "Index Cond: ((instance_uuid",
        "purge trail": "instance_uuid=?" if backend == "sqlite" else "instance_uuid",
    }
    for what, call in calls.items():
        for statement, parameters in statements(db, call):
            text = plan(db, backend, statement, parameters)
            assert must.get(what, "") in text, (what, text)
            if backend == "sqlite":
                assert "SCAN instances" not in text and "SCAN instance_actions" not in text, (
                    what,
                    text,
                )
            else:
                assert "Seq Scan" not in text, (what, text)
    assert len(db.instance_get_deleted_by_domain_names(HOST, names)) == 20
