"""The /metrics scrape: its time, its cost to the hub, and its libvirt calls.

For 100, 1000 and 5000 instances, an agent (NodeService, ComputeManager,
the libvirt driver on the test driver served by the real libvirtd,
``test+unix://``, SQLite rows) takes one statistics sample, then serves
``/metrics`` on a free port. The test driver reports a domain's state
only, so every sample is then filled in with CPU time, memory, RSS, vCPUs
and block and network bytes, as a QEMU host reports them: the text a
scrape builds is the size of a real host's. A client in a native thread
scrapes it SCRAPES times, one after another, while a greenthread on the
hub wakes every millisecond and records how late it was.

Hub cost, per scrape: how long the hub's wake-ups were held up in all
during the scrapes, less the same over an idle window as long right after
(the host's own noise), divided by the scrapes; and the worst and p99
lateness of a wake-up, scraping and idle. The client is a native thread of
the same process, so its own Python competes for the GIL too: Prometheus,
in its own process, costs the hub less. Libvirt use is counted as in ``idle_cost``
(every virConnect/virDomain method called from any thread, and every trip
through ``Host.run``).

Beside it, a per-scrape exporter's approach, as the common libvirt
exporters work: each scrape calls ``getAllDomainStats`` (the same stats
groups as the agent) on its own connection to the same libvirtd and builds
its text from the answer with prometheus_client. Timed in a native thread,
as that exporter's own process would run it. (On the test driver the
answer holds the state only, so its text is smaller than on a QEMU host.)
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import libvirt
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import generate_latest

from bench.common import (
    LibvirtCalls,
    Ticker,
    load_average,
    make_conf,
    make_db,
    save,
    skip_without_libvirtd,
    table,
    test_host,
)
from compute_agent import green
from compute_agent.manager import ComputeManager
from compute_agent.metrics.collector import AgentCollector
from compute_agent.metrics.server import MetricsServer
from compute_agent.service import NodeService
from compute_agent.utils import percentile
from compute_agent.virt.driver import DomainStats
from compute_agent.virt.libvirt.driver import STATS_GROUPS, STATS_NOWAIT, LibvirtDriver

COUNTS = (100, 1000, 5000)
SCRAPES = {100: 30, 1000: 10, 5000: 5}
RUNS = 3
TICK_S = 0.001
_socket = green.native_socket_module()


def http_get(port: int) -> tuple[float, int]:
    """One scrape over a native socket (in a native thread): seconds, bytes."""
    t0 = time.perf_counter()
    with _socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(b"GET /metrics HTTP/1.0\r\nHost: bench\r\n\r\n")
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    data = b"".join(chunks)
    assert data.startswith(b"HTTP/1.0 200"), data[:200]
    return time.perf_counter() - t0, len(data)


def fill_samples(manager: ComputeManager) -> None:
    """Every kept sample as a QEMU guest's: all fields set."""
    store = manager.stats.store
    for uuid, entry in store.entries():
        old = entry.sample
        assert old is not None, "the statistics cycle sampled every instance"
        stats = DomainStats(
            name=old.stats.name,
            uuid=old.stats.uuid,
            state=old.stats.state,
            cpu_time_ns=123_456_789_000,
            vcpus=1,
            memory_kb=65536,
            memory_max_kb=65536,
            memory_rss_kb=180_000,
            net_rx_bytes=1_234_567,
            net_tx_bytes=7_654_321,
            block_rd_bytes=98_765_432,
            block_wr_bytes=12_345_678,
        )
        store.record(uuid, stats, old.taken_mono + 1e-6, old.taken_at)


def hub_window(scrapes: int, work: Any) -> dict[str, Any]:
    """Run ``work`` (in a native thread) while the hub's wake-ups are timed, then idle as long."""
    ticker = Ticker(TICK_S).start()
    green.sleep(0.05)
    ticker.lateness.clear()
    t0 = green.monotonic()
    result = green.execute(work)
    wall = green.monotonic() - t0
    late = list(ticker.stop())
    idle = Ticker(TICK_S).start()
    green.sleep(0.05)
    idle.lateness.clear()
    green.sleep(wall)
    calm = list(idle.stop())
    return {
        "result": result,
        "wall_s": wall,
        # How long the hub's wake-ups were held up in all, beyond idle, per scrape.
        "hub_stall_per_scrape_ms": max(0.0, sum(late) - sum(calm)) / scrapes * 1000,
        "lag_max_ms": max(late, default=0.0) * 1000,
        "lag_p99_ms": percentile(late, 0.99) * 1000,
        "idle_lag_max_ms": max(calm, default=0.0) * 1000,
        "idle_lag_p99_ms": percentile(calm, 0.99) * 1000,
    }


def agent_runs(count: int, uri: str, calls: LibvirtCalls) -> list[dict[str, Any]]:
    conf = make_conf(
        **{
            "libvirt.connection_uri": uri,
            "compute.stats_interval": 0,
            "compute.sync_power_state_interval": -1,
            "report_interval": 60,
        }
    )
    db = make_db(count)
    manager = ComputeManager(conf, db, LibvirtDriver(conf))
    service = NodeService(conf, db, components=[manager])
    service.start()
    server = MetricsServer("127.0.0.1", 0, AgentCollector(service, manager))
    try:
        summary = manager.stats.run()
        assert summary.sampled == count, summary
        fill_samples(manager)
        server.start()
        port = server.bound_port
        http_get(port)  # warm-up
        scrapes = SCRAPES[count]
        rows = []
        for _ in range(RUNS):
            before = calls.snapshot()

            def work() -> list[tuple[float, int]]:
                return [http_get(port) for _ in range(scrapes)]

            window = hub_window(scrapes, work)
            counted = LibvirtCalls.delta(before, calls.snapshot())
            times = [t for t, _ in window["result"]]
            rows.append(
                {
                    "scrape_ms": statistics.median(times) * 1000,
                    "bytes": window["result"][-1][1],
                    **{k: v for k, v in window.items() if k.endswith("_ms")},
                    "libvirt_api_per_scrape": counted["api"] / scrapes,
                    "trips_per_scrape": counted["trips"] / scrapes,
                }
            )
        return rows
    finally:
        server.stop()
        service.stop()


def exporter_text(conn: Any) -> tuple[bytes, float]:
    """One scrape the per-scrape way: getAllDomainStats, then the text."""
    t0 = time.perf_counter()
    records = conn.getAllDomainStats(STATS_GROUPS, STATS_NOWAIT)
    call_s = time.perf_counter() - t0
    state = GaugeMetricFamily("libvirt_domain_info_state", "state", labels=["domain", "uuid"])
    cpu = CounterMetricFamily("libvirt_domain_cpu_time_seconds", "cpu", labels=["domain", "uuid"])
    mem = GaugeMetricFamily("libvirt_domain_memory_rss_bytes", "rss", labels=["domain", "uuid"])
    vcpus = GaugeMetricFamily("libvirt_domain_vcpus", "vcpus", labels=["domain", "uuid"])
    for dom, stats in records:
        labels = [dom.name(), dom.UUIDString()]
        state.add_metric(labels, stats.get("state.state", 0))
        cpu.add_metric(labels, stats.get("cpu.time", 0) / 1e9)
        mem.add_metric(labels, stats.get("balloon.rss", 0) * 1024)
        vcpus.add_metric(labels, stats.get("vcpu.current", 0))

    class _Families:
        def collect(self) -> Any:
            return iter((state, cpu, mem, vcpus))

    return generate_latest(_Families()), call_s  # type: ignore[arg-type]


def exporter_runs(count: int, uri: str, calls: LibvirtCalls) -> list[dict[str, Any]]:
    conn = green.execute(libvirt.open, uri)
    try:
        exporter_text(conn)  # warm-up
        scrapes = SCRAPES[count]
        rows = []
        for _ in range(RUNS):
            before = calls.snapshot()

            def work() -> list[tuple[float, float, int]]:
                out = []
                for _ in range(scrapes):
                    t0 = time.perf_counter()
                    text, call_s = exporter_text(conn)
                    out.append((time.perf_counter() - t0, call_s, len(text)))
                return out

            results = green.execute(work)
            counted = LibvirtCalls.delta(before, calls.snapshot())
            rows.append(
                {
                    "scrape_ms": statistics.median(r[0] for r in results) * 1000,
                    "call_ms": statistics.median(r[1] for r in results) * 1000,
                    "bytes": results[-1][2],
                    "libvirt_rpc_per_scrape": counted["rpc"] / scrapes,
                }
            )
        return rows
    finally:
        green.execute(conn.close)


def spread(rows: list[dict[str, Any]], key: str) -> str:
    values = sorted(r[key] for r in rows)
    return f"{statistics.median(values):.2f} ({values[0]:.2f}-{values[-1]:.2f})"


def main(argv: list[str] | None = None) -> None:
    skipped = skip_without_libvirtd()
    if skipped:
        print(skipped)
        return
    results: dict[str, Any] = {"load_before": load_average(), "counts": {}}
    agent_table, exporter_table = [], []
    with LibvirtCalls() as calls:
        for count in COUNTS:
            _, uri = test_host(count)
            agent = agent_runs(count, uri, calls)
            exporter = exporter_runs(count, uri, calls)
            results["counts"][count] = {"agent": agent, "exporter": exporter}
            agent_table.append(
                [
                    count,
                    spread(agent, "scrape_ms"),
                    f"{agent[-1]['bytes'] // 1024} KiB",
                    spread(agent, "hub_stall_per_scrape_ms"),
                    f"{spread(agent, 'lag_max_ms')} / {spread(agent, 'idle_lag_max_ms')}",
                    f"{spread(agent, 'lag_p99_ms')} / {spread(agent, 'idle_lag_p99_ms')}",
                    max(r["libvirt_api_per_scrape"] for r in agent),
                    max(r["trips_per_scrape"] for r in agent),
                ]
            )
            exporter_table.append(
                [
                    count,
                    spread(exporter, "scrape_ms"),
                    spread(exporter, "call_ms"),
                    f"{exporter[-1]['bytes'] // 1024} KiB",
                    max(r["libvirt_rpc_per_scrape"] for r in exporter),
                ]
            )
            print(f"{count} instances done", flush=True)
    results["load_after"] = load_average()
    print(
        table(
            [
                "instances",
                "agent scrape ms",
                "text",
                "hub stall ms / scrape",
                "hub lag max ms (scraping / idle)",
                "hub lag p99 ms (scraping / idle)",
                "libvirt calls / scrape",
                "Host.run trips / scrape",
            ],
            agent_table,
        )
    )
    print()
    print(
        table(
            [
                "instances",
                "per-scrape exporter ms",
                "of which getAllDomainStats ms",
                "text",
                "libvirt RPC calls / scrape",
            ],
            exporter_table,
        )
    )
    print(f"\nload before {results['load_before']}, after {results['load_after']}")
    print(f"saved {save('metrics_scrape', results)}")


if __name__ == "__main__":
    main()
