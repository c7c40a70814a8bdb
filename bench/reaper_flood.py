"""Guests of deleted instances by the thousand: one reaper run, the hub meanwhile.

A host (libvirt's test driver in-process, a ``test:///abs/file.xml`` node)
runs N domains whose instances are all soft-deleted; each run must act on at
most ``max_per_run`` of them and never hold the hub: a 10 ms ticker records
how late it woke during the run. SQLite (its work in a native thread) and
PostgreSQL (on the hub, chunked) when a server is there. Start-up's objects
are frozen first, as the agent freezes them (see utils.freeze_long_lived_objects).
"""

from __future__ import annotations

import sys
from typing import Any

import sqlalchemy as sa

from bench.common import (
    HOST,
    Ticker,
    load_average,
    make_conf,
    make_db,
    ms,
    save,
    server_database,
    table,
    test_host,
)
from compute_agent.db.models import Instance
from compute_agent.locks import KeyedLocks
from compute_agent.reaper import DeletedGuestReaper
from compute_agent.utils import freeze_long_lived_objects, utcnow
from compute_agent.virt.libvirt.driver import LibvirtDriver

COUNTS = (3000,)
BOUNDS = (50, 1000)


def one(count: int, bound: int, url: str | None) -> dict[str, Any]:
    db = make_db(count, url=url)
    with db.engine.begin() as conn:
        conn.execute(sa.update(Instance).values(deleted=True, deleted_at=utcnow()))
    uri, _ = test_host(count)
    conf = make_conf(**{"libvirt.connection_uri": uri})
    driver = LibvirtDriver(conf)
    driver.init_host(HOST)
    reaper = DeletedGuestReaper(db, driver, HOST, KeyedLocks(), max_per_run=bound)
    freeze_long_lived_objects()  # as the agent does once started
    ticker = Ticker().start()
    summary = reaper.run()
    late = ticker.stop()
    left = len(driver.list_domains())
    driver.cleanup_host()
    db.dispose()
    return {
        "found": summary.found,
        "reaped": summary.reaped,
        "errors": summary.errors,
        "deferred": summary.deferred,
        "left": left,
        "seconds": summary.duration_s,
        "max_late_s": max(late, default=0.0),
    }


def _drop_tables(url: str) -> None:
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        for name in ("instance_actions", "instances", "services", "alembic_version"):
            conn.execute(sa.text(f"DROP TABLE IF EXISTS {name} CASCADE"))
    engine.dispose()


def main(argv: list[str] | None = None) -> dict:
    rows, results = [], []
    backends: list[tuple[str, str | None, Any]] = [("sqlite", None, None)]
    server = server_database()
    if server is not None:
        backends.append(("postgresql", server[0], server[1]))
    for backend, url, drop in backends:
        for count in COUNTS:
            for bound in BOUNDS:
                r = one(count, bound, url)
                if url is not None:
                    _drop_tables(url)  # the next make_db starts from an empty schema
                r.update(backend=backend, domains=count, bound=bound)
                results.append(r)
                rows.append(
                    [
                        backend,
                        count,
                        bound,
                        r["found"],
                        r["reaped"],
                        r["deferred"],
                        r["left"],
                        f"{r['seconds']:.2f} s",
                        ms(r["max_late_s"]),
                    ]
                )
        if drop is not None:
            drop()
    print(
        table(
            [
                "db",
                "domains",
                "bound",
                "found",
                "reaped",
                "deferred",
                "left",
                "run",
                "hub max late",
            ],
            rows,
        )
    )
    print(f"load average: {load_average()}")
    save("reaper_flood", {"results": results, "load": load_average()})
    return {"results": results}


if __name__ == "__main__":
    main(sys.argv[1:])
