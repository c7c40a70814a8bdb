"""Metric families built at scrape time from the agent's registry and statistics.

Runs in the scrape's native thread. It reads the service's and the
manager's ``statistics()`` (frozen snapshots of plain attributes), whole
objects swapped in by the hub (a sample, the instance table), and copies
of dicts made in one C call. It never calls libvirt or the database:
every value comes from the last sample or the last read.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from compute_agent import green
from compute_agent.metrics import registry

if TYPE_CHECKING:
    from compute_agent.manager import ComputeManager
    from compute_agent.retention import RetentionStatistics
    from compute_agent.service import NodeService
    from compute_agent.virt.driver import DriverStatistics

PREFIX = "compute_agent_"


def _histogram(
    name: str, doc: str, labels: list[str], family: registry.HistogramFamily
) -> HistogramMetricFamily:
    metric = HistogramMetricFamily(PREFIX + name, doc, labels=labels)
    for values, child in family.items():
        _add_histogram(metric, list(values), child)
    return metric


def _add_histogram(
    metric: HistogramMetricFamily, values: list[str], child: registry.Histogram
) -> None:
    buckets, _count, total = child.snapshot()
    metric.add_metric(
        values, [("+Inf" if math.isinf(b) else repr(b), n) for b, n in buckets], total
    )


def _counter(
    name: str, doc: str, labels: list[str], family: registry.CounterFamily
) -> CounterMetricFamily:
    metric = CounterMetricFamily(PREFIX + name, doc, labels=labels)
    for values, n in family.items():
        metric.add_metric(list(values), n)
    return metric


def _gauge(
    name: str, doc: str, value: float | None = None, labels: list[str] | None = None
) -> GaugeMetricFamily:
    metric = GaugeMetricFamily(PREFIX + name, doc, labels=labels)
    if value is not None:
        metric.add_metric([], value)
    return metric


class AgentCollector:
    """A prometheus_client collector over one agent's service and manager."""

    def __init__(self, service: NodeService, manager: ComputeManager) -> None:
        self.service = service
        self.manager = manager

    def collect(self) -> Iterator[Metric]:
        now = green.monotonic()
        yield from self._host(now)
        yield from self._requests()
        yield from self._instances(now)

    # -- the host ---------------------------------------------------------

    def _host(self, now: float) -> Iterator[Metric]:
        service, agent = self.service.statistics(), self.manager.statistics()
        lag = HistogramMetricFamily(
            PREFIX + "hub_lag_seconds", "How late the hub woke the lag monitor's greenthread."
        )
        _add_histogram(lag, [], registry.HUB_LAG)
        yield lag
        backend = GaugeMetricFamily(
            PREFIX + "concurrency_backend",
            "1 for the concurrency backend this agent runs on (eventlet or threads).",
            labels=["backend"],
        )
        backend.add_metric([green.BACKEND], 1.0)
        yield backend
        beat = service.heartbeat_at or service.started_at
        yield _gauge(
            "heartbeat_age_seconds",
            "Seconds since the last heartbeat written (since start, before the first).",
            round(max(0.0, now - beat), 3),
        )
        yield _gauge(
            "service_disabled",
            "1 when the service is disabled (by an operator, or AUTO: while libvirt is away).",
            1.0 if service.disabled else 0.0,
        )
        yield _histogram(
            "periodic_task_duration_seconds",
            "How long each periodic task's runs took.",
            ["task"],
            registry.TASK_DURATION,
        )
        failures = CounterMetricFamily(
            PREFIX + "periodic_task_failures",
            "Runs of a periodic task that failed.",
            labels=["task"],
        )
        for task in service.tasks:
            failures.add_metric([task.name], task.failures)
        yield failures
        yield _counter(
            "power_sync_instances",
            "Instances handled by power syncs (periodic, forced and after events), by outcome.",
            ["outcome"],
            registry.POWER_SYNC_INSTANCES,
        )
        yield _gauge(
            "libvirt_connected",
            "1 while the agent holds a connection to libvirt.",
            1.0 if agent.connected else 0.0,
        )
        yield from self._connections(agent.driver)
        yield _histogram(
            "libvirt_call_duration_seconds",
            "Calls the driver sent to the native thread pool, by call, waiting included.",
            ["call"],
            registry.LIBVIRT_CALL_DURATION,
        )
        events = CounterMetricFamily(
            PREFIX + "lifecycle_events",
            "libvirt lifecycle events, by what became of them (received, synced, delayed, "
            "cancelled, coalesced, ignored, not_ours, stops, rechecks, errors).",
            labels=["outcome"],
        )
        if agent.events is not None:
            for outcome in EVENT_OUTCOMES:
                events.add_metric([outcome], getattr(agent.events, outcome))
        yield events
        builds = agent.builds
        yield _gauge("builds_in_progress", "Builds running now.", builds.running)
        yield _gauge("builds_queued", "Builds waiting for a build slot.", builds.queued)
        yield from self._retention(agent.retention)

    def _retention(self, retention: RetentionStatistics) -> Iterator[Metric]:
        purged = CounterMetricFamily(
            PREFIX + "db_purged_rows",
            "Rows the agent's retention removed since start: deleted instances, their audit "
            "rows, and old audit rows of live instances ([database] purge_*_after_days).",
            labels=["table", "which"],
        )
        totals = retention.totals
        purged.add_metric(["instances", "deleted"], totals.get("instances", 0))
        purged.add_metric(["instance_actions", "deleted"], totals.get("instance_actions", 0))
        purged.add_metric(["instance_actions", "live"], totals.get("live_instance_actions", 0))
        yield purged
        yield CounterMetricFamily(
            PREFIX + "db_purge_runs", "Runs of the retention task since start.", retention.runs
        )
        last = retention.last_run or {}
        yield _gauge(
            "db_purge_last_duration_seconds",
            "How long the retention task's last run took (0 before the first).",
            float(last.get("duration_s") or 0.0),
        )

    @staticmethod
    def _connections(driver: DriverStatistics | None) -> Iterator[Metric]:
        """The connections carrying libvirt calls (one call each), when the driver has them."""
        pool = driver.connections if driver is not None else None
        if pool is None:
            return
        states = _gauge(
            "libvirt_connections",
            "libvirt connections that carry calls, by state: idle, busy (one call each), "
            "and stuck (set aside: a call ran past [libvirt] stuck_call_timeout).",
            labels=["state"],
        )
        states.add_metric(["idle"], pool.open - pool.busy)
        states.add_metric(["busy"], pool.busy - pool.stuck)
        states.add_metric(["stuck"], pool.stuck)
        yield states
        set_aside = CounterMetricFamily(
            PREFIX + "libvirt_connections_set_aside",
            "libvirt connections set aside because a call in them ran past the deadline.",
        )
        set_aside.add_metric([], pool.stuck_total)
        yield set_aside

    def _requests(self) -> Iterator[Metric]:
        yield _counter(
            "requests",
            "Requests answered, by front door (rpc, admin), method and outcome "
            "(ok, or the error's type).",
            ["front", "method", "outcome"],
            registry.REQUESTS,
        )
        yield _histogram(
            "request_duration_seconds",
            "How long requests took, intake wait included.",
            ["front", "method"],
            registry.REQUEST_DURATION,
        )

    # -- instances --------------------------------------------------------

    def _instances(self, now: float) -> Iterator[Metric]:
        """The counts by state; the per-instance families are :meth:`instance_text`."""
        counts = GaugeMetricFamily(
            PREFIX + "instances",
            "Instances of this host by vm_state and power_state (as last read).",
            labels=["vm_state", "power_state"],
        )
        index = self.manager.instance_index.snapshot()
        for (vm, power), n in sorted(
            Counter((f.vm_state, f.power_state) for f in index.values()).items()
        ):
            counts.add_metric([vm, power], n)
        yield counts

    def instance_text(self) -> str:
        """The per-instance families, written as text directly.

        At thousands of instances, prometheus_client's objects (a sample
        tuple and a label dict per line) made a scrape allocate enough
        containers to start full garbage collections, which hold the GIL,
        and so the hub, for 50 ms and more. Strings are not tracked by the
        collector; this writes strings only, and gives up the GIL between
        batches of instances.
        """
        now = green.monotonic()
        index = self.manager.instance_index.snapshot()
        stats = self.manager.stats
        entries = stats.samples()
        after = stats.statistics().unresponsive_after
        lines: dict[str, list[str]] = {name: [] for name, _, _ in INSTANCE_FAMILIES}
        for n, (uuid, facts) in enumerate(list(index.items()), 1):
            ids = f'uuid="{_escape(uuid)}",name="{_escape(facts.name)}"'
            lines["instance_info"].append(
                f'{{{ids},vm_state="{_escape(facts.vm_state)}",'
                f'power_state="{_escape(facts.power_state)}"}} 1'
            )
            entry = entries.get(uuid)
            sample = entry.sample if entry is not None else None
            if entry is not None:
                last = sample.taken_mono if sample is not None else entry.tracked_since
                lines["instance_stats_unresponsive"].append(
                    f"{{{ids}}} {1 if now - last > after else 0}"
                )
            if sample is None:
                lines["instance_vcpus"].append(f"{{{ids}}} {facts.vcpus}")
            else:
                st = sample.stats
                vcpus = st.vcpus if st.vcpus is not None else facts.vcpus
                lines["instance_vcpus"].append(f"{{{ids}}} {vcpus}")
                age = round(max(0.0, now - sample.taken_mono), 3)
                lines["instance_stats_age_seconds"].append(f"{{{ids}}} {age}")
                for name, value in (
                    ("instance_cpu_seconds_total", _scaled(st.cpu_time_ns, 1e-9)),
                    ("instance_memory_rss_bytes", _scaled(st.memory_rss_kb, 1024)),
                    ("instance_memory_bytes", _scaled(st.memory_kb, 1024)),
                    ("instance_block_read_bytes_total", st.block_rd_bytes),
                    ("instance_block_write_bytes_total", st.block_wr_bytes),
                    ("instance_network_receive_bytes_total", st.net_rx_bytes),
                    ("instance_network_transmit_bytes_total", st.net_tx_bytes),
                ):
                    if value is not None:
                        lines[name].append(f"{{{ids}}} {value}")
            if n % YIELD_EVERY == 0:
                green.native_sleep(0)  # let the hub's thread take the GIL
        out: list[str] = []
        for name, kind, doc in INSTANCE_FAMILIES:
            full = PREFIX + name
            out.append(f"# HELP {full} {doc}\n# TYPE {full} {kind}\n")
            out.extend(f"{full}{line}\n" for line in lines[name])
        return "".join(out)


EVENT_OUTCOMES = (
    "received", "synced", "delayed", "cancelled", "coalesced", "ignored", "not_ours", "stops",
    "rechecks", "errors",
)  # fmt: skip

# Instances written between two gives of the GIL by the scrape thread.
YIELD_EVERY = 100

# (name as served, type, help) of the per-instance families, all labelled uuid and name.
INSTANCE_FAMILIES = (
    ("instance_info", "gauge", "1 per instance, labelled with its vm_state and power_state."),
    ("instance_vcpus", "gauge", "vCPUs of the instance (sampled, else as recorded)."),
    ("instance_cpu_seconds_total", "counter", "CPU time the guest used (libvirt cpu.time)."),
    ("instance_memory_rss_bytes", "gauge", "Resident memory of the guest's QEMU process."),
    ("instance_memory_bytes", "gauge", "Memory the guest has now (balloon current)."),
    ("instance_block_read_bytes_total", "counter", "Bytes read from the guest's disks."),
    ("instance_block_write_bytes_total", "counter", "Bytes written to the guest's disks."),
    ("instance_network_receive_bytes_total", "counter", "Bytes received by the guest's NICs."),
    ("instance_network_transmit_bytes_total", "counter", "Bytes sent by the guest's NICs."),
    (
        "instance_stats_unresponsive",
        "gauge",
        "1 when no complete sample came for [compute] stats_unresponsive_after seconds.",
    ),
    ("instance_stats_age_seconds", "gauge", "Age of the instance's last complete sample."),
)


def _escape(value: str) -> str:
    """A label value as the text format wants it: backslash, quote and newline escaped."""
    if "\\" in value or '"' in value or "\n" in value:
        return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return value


def _scaled(value: int | None, factor: float) -> float | int | None:
    if value is None:
        return None
    scaled = value * factor
    return int(scaled) if isinstance(factor, int) else scaled
