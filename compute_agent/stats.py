"""Statistics sampling: one bulk call per cycle, samples kept in memory.

Where the driver has a bulk call (libvirt's ``getAllDomainStats``), a cycle
makes one call for every domain, with NOWAIT so that a domain whose QEMU
job is taken comes back incomplete instead of blocking the call. NOWAIT is
not enough on its own: the first call to reach a QEMU that just froze takes
its job and waits for the monitor for ever. So every call has a deadline; a
call that misses it is left in its native thread and the cycle goes on
without it (its job then makes later NOWAIT calls skip that domain). Drivers
with no bulk call are sampled per instance with the same deadline, and an
instance whose last call has not returned is not asked again.

The store keeps, per instance, the newest complete sample and when it was
taken: an older sample never replaces a newer one, the samples of instances
that left the host are dropped every cycle, and an instance with no fresh
sample for ``stats_unresponsive_after`` seconds is reported unresponsive.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

from compute_agent import exception, green
from compute_agent.db.api import Database, InstanceRecord
from compute_agent.utils import utcnow
from compute_agent.virt.driver import ComputeDriver, DomainStats

LOG = logging.getLogger(__name__)
T = TypeVar("T")

# Calls past their deadline that may still hold a native thread. Beyond
# this many, no new call is made: hung calls must not eat the thread pool.
MAX_STUCK_CALLS = 4
# How often a call waiting for one in flight to answer (or be left behind) looks again.
STUCK_POLL_S = 0.01


@dataclass
class Sample:
    stats: DomainStats
    taken_at: dt.datetime  # wall clock (UTC), for people
    taken_mono: float  # monotonic, for ages and ordering


@dataclass
class _Entry:
    tracked_since: float
    sample: Sample | None = None
    last_incomplete: float | None = None
    unresponsive: bool = False


class StatsStore:
    """The newest complete sample of each instance of this host."""

    def __init__(self, unresponsive_after: float) -> None:
        self.unresponsive_after = unresponsive_after
        self._entries: dict[str, _Entry] = {}

    def track(self, uuids: set[str], now: float) -> None:
        """Keep exactly these instances: new ones start their clock now."""
        for uuid in list(self._entries):
            if uuid not in uuids:
                del self._entries[uuid]
        for uuid in uuids:
            self._entries.setdefault(uuid, _Entry(tracked_since=now))

    def forget(self, uuid: str) -> None:
        self._entries.pop(uuid, None)

    def record(
        self, uuid: str, stats: DomainStats, taken_mono: float, taken_at: dt.datetime
    ) -> bool:
        """Keep ``stats`` unless a newer sample is already kept; True if kept."""
        entry = self._entries.get(uuid)
        if entry is None:
            return False  # no longer on this host
        if not stats.complete:
            if entry.last_incomplete is None or entry.last_incomplete < taken_mono:
                entry.last_incomplete = taken_mono
            return False
        if entry.sample is not None and entry.sample.taken_mono >= taken_mono:
            return False
        entry.sample = Sample(stats, taken_at, taken_mono)
        return True

    def is_unresponsive(self, uuid: str, now: float) -> bool:
        entry = self._entries.get(uuid)
        if entry is None:
            return False
        last = entry.sample.taken_mono if entry.sample else entry.tracked_since
        return now - last > self.unresponsive_after

    def update_unresponsive(self, now: float) -> tuple[list[str], list[str]]:
        """Re-judge every instance; return (newly unresponsive, recovered)."""
        lost, back = [], []
        for uuid, entry in self._entries.items():
            now_bad = self.is_unresponsive(uuid, now)
            if now_bad and not entry.unresponsive:
                lost.append(uuid)
            elif entry.unresponsive and not now_bad:
                back.append(uuid)
            entry.unresponsive = now_bad
        return lost, back

    def unresponsive(self) -> list[str]:
        return sorted(u for u, e in self._entries.items() if e.unresponsive)

    def get(self, uuid: str, now: float) -> dict[str, Any]:
        """The latest sample of ``uuid`` with its age; raise InstanceNotFound if untracked."""
        entry = self._entries.get(uuid)
        if entry is None:
            raise exception.InstanceNotFound(uuid, "no statistics kept for it on this host")
        sample = entry.sample
        stats = None
        if sample is not None:
            stats = asdict(sample.stats)
            stats["state"] = str(sample.stats.state)
            del stats["complete"]
        return {
            "uuid": uuid,
            "stats": stats,
            "taken_at": sample.taken_at.isoformat() + "Z" if sample else None,
            "age_s": round(now - sample.taken_mono, 3) if sample else None,
            "unresponsive": self.is_unresponsive(uuid, now),
        }

    def entries(self) -> list[tuple[str, _Entry]]:
        """A copy of the table, safe to read from another native thread (one C call)."""
        return list(self._entries.items())

    def __len__(self) -> int:
        return len(self._entries)


@dataclass
class StatsSummary:
    mode: str = "bulk"
    instances: int = 0
    sampled: int = 0
    incomplete: int = 0
    missing: int = 0
    calls: int = 0
    timed_out: int = 0
    unresponsive: list[str] = field(default_factory=list)
    duration_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class SamplerStatistics:
    """What the sampler tells of itself; safe to take from another native thread."""

    cycles: int
    tracked: int  # instances of this host it keeps a sample for
    unresponsive: tuple[str, ...]  # UUIDs, sorted, as judged at the last cycle
    unresponsive_after: float


class StatsSampler:
    def __init__(
        self,
        db: Database,
        driver: ComputeDriver,
        host: str,
        *,
        call_timeout: float,
        unresponsive_after: float,
        concurrency: int = 4,
        on_instances: Callable[[list[InstanceRecord], float], None] | None = None,
    ) -> None:
        """``on_instances``: told of each cycle's instance list and when it was
        read (the metrics' index of the host's instances)."""
        self.db = db
        self.driver = driver
        self.host = host
        self.call_timeout = call_timeout
        self.concurrency = max(1, concurrency)
        self.store = StatsStore(unresponsive_after)
        self._stuck: set[str] = set()  # keys of calls past their deadline
        self._in_flight = 0  # calls not yet returned nor past their deadline
        self._stuck_guard = green.native_lock()  # both change on several tasks
        self._cycles = 0
        self._on_instances = on_instances

    def run(self) -> StatsSummary:
        """One cycle: sample every instance of this host."""
        started = green.monotonic()
        self._cycles += 1
        summary = StatsSummary(mode="bulk" if self.driver.has_bulk_stats else "per-instance")
        instances = self.db.instance_get_all_by_host(self.host)
        if self._on_instances is not None:
            self._on_instances(instances, started)
        summary.instances = len(instances)
        self.store.track({i.uuid for i in instances}, started)
        if self.driver.has_bulk_stats:
            self._bulk(instances, summary)
        else:
            self._per_instance(instances, summary)
        now = green.monotonic()
        lost, back = self.store.update_unresponsive(now)
        for uuid in lost:
            LOG.warning(
                "instance %s is unresponsive: no complete statistics for over %.0f s",
                uuid,
                self.store.unresponsive_after,
            )
        for uuid in back:
            LOG.info("instance %s answers statistics again", uuid)
        summary.unresponsive = self.store.unresponsive()
        summary.duration_s = round(now - started, 4)
        LOG.debug("statistics cycle: %s", summary)
        return summary

    def get(self, uuid: str) -> dict[str, Any]:
        return self.store.get(uuid, green.monotonic())

    def statistics(self) -> SamplerStatistics:
        entries = self.store.entries()  # one C call: safe off the hub
        return SamplerStatistics(
            cycles=self._cycles,
            tracked=len(entries),
            unresponsive=tuple(sorted(u for u, e in entries if e.unresponsive)),
            unresponsive_after=self.store.unresponsive_after,
        )

    def samples(self) -> dict[str, _Entry]:
        """Each tracked instance's entry (newest complete sample, tracked since), a copy."""
        return dict(self.store.entries())

    # -- one cycle --------------------------------------------------------

    def _bulk(self, instances: list[InstanceRecord], summary: StatsSummary) -> None:
        taken_mono, taken_at = green.monotonic(), utcnow()
        summary.calls += 1
        try:
            by_name = self._call(f"bulk#{self._cycles}", self.driver.get_all_stats)
        except TimeoutError:
            summary.timed_out += 1
            summary.missing = len(instances)
            return
        for inst in instances:
            stats = by_name.get(inst.domain_name)
            if stats is None or stats.uuid.lower() != inst.uuid.lower():
                summary.missing += 1
                continue
            self._keep(inst.uuid, stats, taken_mono, taken_at, summary)

    def _per_instance(self, instances: list[InstanceRecord], summary: StatsSummary) -> None:
        slots = green.Semaphore(self.concurrency)

        def one(inst: InstanceRecord) -> None:
            with slots:
                taken_mono, taken_at = green.monotonic(), utcnow()
                summary.calls += 1
                try:
                    stats = self._call(inst.uuid, self.driver.get_stats, inst)
                except TimeoutError:
                    summary.timed_out += 1
                    return
                except exception.InstanceNotFound:
                    summary.missing += 1
                    return
                except exception.ComputeAgentError as exc:
                    summary.missing += 1
                    LOG.debug("no statistics for %s: %s", inst.uuid, exc)
                    return
                self._keep(inst.uuid, stats, taken_mono, taken_at, summary)

        workers = []
        for inst in instances:
            if inst.uuid in self._stuck:
                summary.missing += 1  # its last call never returned: do not pile up more
                continue
            workers.append(green.spawn(one, inst, name="stats-sample"))
        for worker in workers:
            worker.wait()

    def _keep(
        self,
        uuid: str,
        stats: DomainStats,
        taken_mono: float,
        taken_at: dt.datetime,
        summary: StatsSummary,
    ) -> None:
        if stats.complete:
            summary.sampled += 1
        else:
            summary.incomplete += 1
        self.store.record(uuid, stats, taken_mono, taken_at)

    def _call(self, key: str, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` with a deadline; a call past it is left to finish alone.

        Raises TimeoutError when the deadline passes or too many calls are stuck.
        """
        while True:
            with self._stuck_guard:
                stuck = len(self._stuck)
                if stuck >= MAX_STUCK_CALLS:
                    raise TimeoutError(f"{stuck} statistics calls still hung; not adding more")
                # Once calls hang, those in flight may hang too: wait (at most
                # about a deadline) until they answer or are left behind, so
                # that concurrent samplers never start more than the limit.
                if not stuck or stuck + self._in_flight < MAX_STUCK_CALLS:
                    self._in_flight += 1
                    break
            green.sleep(STUCK_POLL_S)

        def returned(_: green.Task) -> None:
            with self._stuck_guard:
                if key not in self._stuck:
                    return
                self._stuck.discard(key)
            LOG.info("a statistics call past its deadline returned (%s)", key)

        task = green.submit(fn, *args, name=f"stats-call-{key[:8]}")
        try:
            return task.result(self.call_timeout)  # type: ignore[no-any-return]
        except TimeoutError:
            with self._stuck_guard:
                self._stuck.add(key)
            task.add_done_callback(returned)
            LOG.error(
                "statistics call (%s) still running after %.0f s; going on without it",
                key,
                self.call_timeout,
            )
            raise
        finally:
            with self._stuck_guard:
                self._in_flight -= 1
