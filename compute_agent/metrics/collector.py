"""Metric families built at scrape time from the agent's own figures.

Runs in the scrape's native thread. It only reads: plain attributes
(ints, floats, bools), whole objects swapped in by the hub (a sample, the
instance table), and copies of dicts made in one C call. It never calls
libvirt or the database: every value comes from the last sample or the
last read.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from compute_agent import green
from compute_agent.metrics import figures

PREFIX = "compute_agent_"
INSTANCE = ["uuid", "name"]


def _histogram(name: str, doc: str, labels: list[str], family: Any) -> HistogramMetricFamily:
    metric = HistogramMetricFamily(PREFIX + name, doc, labels=labels)
    for values, child in family.items():
        _add_histogram(metric, list(values), child)
    return metric


def _add_histogram(metric: HistogramMetricFamily, values: list[str], child: Any) -> None:
    buckets, _count, total = child.snapshot()
    metric.add_metric(
        values, [("+Inf" if math.isinf(b) else repr(b), n) for b, n in buckets], total
    )


def _counter(name: str, doc: str, labels: list[str], family: Any) -> CounterMetricFamily:
    metric = CounterMetricFamily(PREFIX + name, doc, labels=labels)
    for values, n in family.items():
        metric.add_metric(list(values), n)
    return metric


def _gauge(name: str, doc: str, value: float | None = None, labels: list[str] | None = None):
    metric = GaugeMetricFamily(PREFIX + name, doc, labels=labels)
    if value is not None:
        metric.add_metric([], value)
    return metric


class AgentCollector:
    """A prometheus_client collector over one agent's service and manager."""

    def __init__(self, service: Any, manager: Any) -> None:
        self.service = service
        self.manager = manager

    def collect(self) -> Iterator[Metric]:
        now = green.monotonic()
        yield from self._host(now)
        yield from self._requests()
        yield from self._instances(now)

    # -- the host ---------------------------------------------------------

    def _host(self, now: float) -> Iterator[Metric]:
        service, manager = self.service, self.manager
        lag = HistogramMetricFamily(
            PREFIX + "hub_lag_seconds", "How late the hub woke the lag monitor's greenthread."
        )
        _add_histogram(lag, [], figures.HUB_LAG)
        yield lag
        beat = getattr(service, "heartbeat_at", None) or getattr(service, "started_at_mono", now)
        yield _gauge(
            "heartbeat_age_seconds",
            "Seconds since the last heartbeat written (since start, before the first).",
            round(max(0.0, now - beat), 3),
        )
        yield _gauge(
            "service_disabled",
            "1 when the service is disabled (by an operator, or AUTO: while libvirt is away).",
            1.0 if getattr(service, "disabled", False) else 0.0,
        )
        yield _histogram(
            "periodic_task_duration_seconds",
            "How long each periodic task's runs took.",
            ["task"],
            figures.TASK_DURATION,
        )
        failures = CounterMetricFamily(
            PREFIX + "periodic_task_failures",
            "Runs of a periodic task that failed.",
            labels=["task"],
        )
        for task in list(service.runner.tasks.values()):
            failures.add_metric([task.name], task.failures)
        yield failures
        yield _counter(
            "power_sync_instances",
            "Instances handled by power syncs (periodic, forced and after events), by outcome.",
            ["outcome"],
            figures.POWER_SYNC_INSTANCES,
        )
        yield _gauge(
            "libvirt_connected",
            "1 while the agent holds a connection to libvirt.",
            1.0 if manager.driver.connected else 0.0,
        )
        yield _histogram(
            "libvirt_call_duration_seconds",
            "Calls the driver sent to the native thread pool, by call, waiting included.",
            ["call"],
            figures.LIBVIRT_CALL_DURATION,
        )
        builds = manager.operations.builds
        yield _gauge("builds_in_progress", "Builds running now.", builds.running)
        yield _gauge("builds_queued", "Builds waiting for a build slot.", builds.queued)

    def _requests(self) -> Iterator[Metric]:
        yield _counter(
            "requests",
            "Requests answered, by front door (rpc, admin), method and outcome "
            "(ok, or the error's type).",
            ["front", "method", "outcome"],
            figures.REQUESTS,
        )
        yield _histogram(
            "request_duration_seconds",
            "How long requests took, intake wait included.",
            ["front", "method"],
            figures.REQUEST_DURATION,
        )

    # -- instances --------------------------------------------------------

    def _instances(self, now: float) -> Iterator[Metric]:
        index = self.manager.instance_index.snapshot()
        store = self.manager.stats.store
        entries = dict(store.entries())
        after = store.unresponsive_after
        counts = GaugeMetricFamily(
            PREFIX + "instances",
            "Instances of this host by vm_state and power_state (as last read).",
            labels=["vm_state", "power_state"],
        )
        for (vm, power), n in sorted(
            Counter((f.vm_state, f.power_state) for f in index.values()).items()
        ):
            counts.add_metric([vm, power], n)
        yield counts

        def gauge(name: str, doc: str, labels: list[str] = INSTANCE) -> GaugeMetricFamily:
            return GaugeMetricFamily(PREFIX + name, doc, labels=labels)

        def counter(name: str, doc: str) -> CounterMetricFamily:
            return CounterMetricFamily(PREFIX + name, doc, labels=INSTANCE)

        info = gauge(
            "instance_info",
            "1 per instance, labelled with its states.",
            INSTANCE + ["vm_state", "power_state"],
        )
        vcpus = gauge("instance_vcpus", "vCPUs of the instance (sampled, else as recorded).")
        cpu = counter("instance_cpu_seconds", "CPU time the guest used (libvirt cpu.time).")
        rss = gauge("instance_memory_rss_bytes", "Resident memory of the guest's process.")
        mem = gauge("instance_memory_bytes", "Memory the guest has now (balloon current).")
        rd = counter("instance_block_read_bytes", "Bytes read from the guest's disks.")
        wr = counter("instance_block_write_bytes", "Bytes written to the guest's disks.")
        rx = counter("instance_network_receive_bytes", "Bytes received by the guest's NICs.")
        tx = counter("instance_network_transmit_bytes", "Bytes sent by the guest's NICs.")
        unresponsive = gauge(
            "instance_stats_unresponsive",
            "1 when no complete sample came for [compute] stats_unresponsive_after seconds.",
        )
        age = gauge("instance_stats_age_seconds", "Age of the instance's last complete sample.")
        for uuid, facts in index.items():
            labels = [uuid, facts.name]
            info.add_metric(labels + [facts.vm_state, facts.power_state], 1.0)
            entry = entries.get(uuid)
            sample = entry.sample if entry is not None else None
            if entry is not None:
                last = sample.taken_mono if sample is not None else entry.tracked_since
                unresponsive.add_metric(labels, 1.0 if now - last > after else 0.0)
            if sample is None:
                vcpus.add_metric(labels, facts.vcpus)
                continue
            stats = sample.stats
            vcpus.add_metric(labels, stats.vcpus if stats.vcpus is not None else facts.vcpus)
            age.add_metric(labels, round(max(0.0, now - sample.taken_mono), 3))
            if stats.cpu_time_ns is not None:
                cpu.add_metric(labels, stats.cpu_time_ns / 1e9)
            for metric, kib in ((rss, stats.memory_rss_kb), (mem, stats.memory_kb)):
                if kib is not None:
                    metric.add_metric(labels, kib * 1024)
            for metric, n in (
                (rd, stats.block_rd_bytes),
                (wr, stats.block_wr_bytes),
                (rx, stats.net_rx_bytes),
                (tx, stats.net_tx_bytes),
            ):
                if n is not None:
                    metric.add_metric(labels, n)
        yield from (info, vcpus, cpu, rss, mem, rd, wr, rx, tx, unresponsive, age)
