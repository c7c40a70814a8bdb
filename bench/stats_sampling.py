"""Statistics sampling: one bulk call against one call per domain.

One StatsSampler cycle over 1000 domains of libvirt's test driver served by
the real libvirtd (``test+unix://``), with the agent's libvirt driver:
first with its bulk call (``getAllDomainStats``, NOWAIT), then forced onto
the per-instance path (a driver subclass that says it has no bulk call, so
the sampler asks ``get_stats`` of each instance, 4 at a time). Libvirt use
is counted as in ``idle_cost``: trips to the thread pool and libvirt API
calls (RPC calls leave out the getters that only read the Python object).

Then the same on ``qemu:///system`` with 10 real guests (64 MiB, diskless,
type qemu) made by the benchmark and removed at the end. There the bulk call
also reads other users' domains on the host (the agent keeps only its own).
"""

from __future__ import annotations

import uuid as uuidlib
from typing import Any

import libvirt

from bench.common import (
    HOST,
    QEMU_URI,
    LibvirtCalls,
    load_average,
    make_conf,
    make_db,
    remove_domains,
    save,
    skip_without_libvirtd,
    table,
    test_host,
)
from compute_agent import green
from compute_agent.db.api import Database
from compute_agent.stats import StatsSampler
from compute_agent.virt.libvirt import domain_xml
from compute_agent.virt.libvirt.driver import LibvirtDriver
from compute_agent.virt.spec import DomainSpec

COUNT = 1000
GUESTS = 10
RUNS = 3  # after one warm-up cycle; the best is reported


class PerInstanceLibvirtDriver(LibvirtDriver):
    """The libvirt driver without its bulk statistics call."""

    @property
    def has_bulk_stats(self) -> bool:
        return False


def cycles(
    where: str,
    uri: str,
    db: Database,
    calls: LibvirtCalls,
    bulk: bool,
    virt_type: str,
    concurrency: int | None = None,
) -> dict:
    conf = make_conf(**{"libvirt.connection_uri": uri, "libvirt.virt_type": virt_type})
    driver = (LibvirtDriver if bulk else PerInstanceLibvirtDriver)(conf)
    driver.init_host(HOST)
    sampler = StatsSampler(
        db,
        driver,
        HOST,
        call_timeout=conf.compute.stats_call_timeout,
        unresponsive_after=conf.compute.stats_unresponsive_after,
        concurrency=concurrency or conf.compute.sync_power_state_concurrency,
    )
    try:
        sampler.run()  # warm-up: connection, statement caches
        timings, counted, summary = [], [], None
        for _ in range(RUNS):
            before = calls.snapshot()
            t0 = green.monotonic()
            summary = sampler.run()
            timings.append(green.monotonic() - t0)
            counted.append(LibvirtCalls.delta(before, calls.snapshot()))
    finally:
        driver.cleanup_host()
    assert summary is not None
    last = counted[-1]
    return {
        "where": where,
        "mode": summary.mode,
        "concurrency": "-" if bulk else sampler.concurrency,
        "instances": summary.instances,
        "sampled": summary.sampled,
        "incomplete": summary.incomplete,
        "missing": summary.missing,
        "timed_out": summary.timed_out,
        "best_s": round(min(timings), 4),
        "runs_s": [round(t, 4) for t in timings],
        "trips": last["trips"],
        "rpc": last["rpc"],
        "api": last["api"],
        "api_by_name": last["api_by_name"],
    }


def test_driver_rows(calls: LibvirtCalls) -> list[dict]:
    _, uri = test_host(COUNT)
    db = make_db(COUNT)
    try:
        return [
            cycles(f"libvirtd test driver, {COUNT} domains", uri, db, calls, bulk, "auto")
            for bulk in (True, False)
        ]
    finally:
        db.dispose()


def qemu_rows(calls: LibvirtCalls) -> list[dict]:
    """10 real guests made by the benchmark, with matching rows; always removed."""
    uuids = [str(uuidlib.uuid4()) for _ in range(GUESTS)]
    db = make_db(0)
    conn = green.execute(libvirt.open, QEMU_URI)
    try:
        for uuid in uuids:
            spec = DomainSpec(f"instance-{uuid}", uuid, 1, 64)
            db.instance_create(
                {
                    "uuid": uuid,
                    "host": HOST,
                    "display_name": f"bench-{uuid[:8]}",
                    "domain_name": spec.name,
                    "vm_state": "active",
                    "task_state": None,
                    "power_state": "running",
                    "vcpus": 1,
                    "memory_mb": 64,
                },
                source="cli",
                reason="stats benchmark",
            )

            def make(xml: str = domain_xml.build(spec, "qemu")) -> None:
                conn.defineXML(xml).create()

            calls.own(make)
        green.sleep(1.0)  # let the guests' QEMU monitors come up
        where = f"qemu:///system, {GUESTS} guests"
        return [
            cycles(where, QEMU_URI, db, calls, True, "qemu"),
            cycles(where, QEMU_URI, db, calls, False, "qemu"),
            cycles(where, QEMU_URI, db, calls, False, "qemu", concurrency=1),
        ]
    finally:
        errors = calls.own(remove_domains, conn, uuids)
        if errors:
            print(f"cleanup errors: {errors}")
        green.execute(conn.close)
        db.dispose()


def fmt(r: dict[str, Any]) -> list[Any]:
    return [
        r["where"],
        r["mode"],
        r["concurrency"],
        f"{r['sampled']}/{r['instances']}",
        r["incomplete"],
        f"{r['best_s'] * 1000:.1f} ms",
        r["trips"],
        r["rpc"],
        r["api"],
    ]


def main() -> dict:
    print(f"load average at the start (1/5/15 min): {load_average()}")
    if (skipped := skip_without_libvirtd()) is not None:
        return skipped
    with LibvirtCalls() as calls:
        results = test_driver_rows(calls)
        results += qemu_rows(calls)
    print(
        table(
            [
                "libvirt",
                "mode",
                "concurrency",
                "sampled",
                "incomplete",
                f"one cycle (best of {RUNS})",
                "trips to the pool",
                "libvirt RPC calls",
                "libvirt API calls (incl. local getters)",
            ],
            [fmt(r) for r in results],
        )
    )
    ratios = {}
    for where in dict.fromkeys(r["where"] for r in results):
        bulk, per = (
            next(r for r in results if r["where"] == where and r["mode"] == mode)
            for mode in ("bulk", "per-instance")
        )
        ratios[where] = {
            "time": round(per["best_s"] / bulk["best_s"], 1),
            "rpc": round(per["rpc"] / max(1, bulk["rpc"]), 1),
        }
        print(
            f"\n{where}: per-instance (concurrency {per['concurrency']}) / bulk = "
            f"{ratios[where]['time']}x the time, "
            f"{ratios[where]['rpc']}x the RPC calls"
        )
    print(f"load average at the end (1/5/15 min): {load_average()}")
    data = {"load_average_end": load_average(), "results": results, "ratios": ratios}
    save("stats_sampling", data)
    return data
