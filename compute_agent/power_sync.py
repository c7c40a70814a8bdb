"""The power-state sync: bring the database in line with the hypervisor.

One query loads the host's instances. Each instance is then handled under
its per-instance lock: the hypervisor's state is read (or taken from one
bulk read) and the policy in ``sync_policy`` decides. A row is written only
if something changed, by a conditional UPDATE on the row's version (its
``updated_at``), so it loses to any change made since the row was read;
such writes share a commit in batches, and each batch carries the audit
rows of the writes that won, so a crash loses neither half.
Every instance ends with a yield, so the rest of the agent keeps running
however long the hypervisor takes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from compute_agent import exception, green, steady, sync_policy
from compute_agent.db.api import AnyInstance, Change, Database, InstanceRecord, action_rows, diff
from compute_agent.locks import KeyedLocks
from compute_agent.metrics import registry
from compute_agent.states import ActionSource, PowerState, VmState
from compute_agent.utils import utcnow
from compute_agent.virt.driver import ComputeDriver

LOG = logging.getLogger(__name__)

MAX_LISTED_UNKNOWN = 100
CHANGED, UNCHANGED, SKIPPED = "changed", "unchanged", "skipped"
# Row writes are committed together, up to this many, or once the oldest
# has waited this long: one commit per row is most of the cost of a sync
# that changes thousands of rows (500 rather than 100: 11 % less CPU for a
# sync of 10,000 changes; a write lost with its batch is made again by the
# next sync, as its row still says the old state).
WRITE_BATCH = 500
WRITE_DELAY_S = 0.5
# Instances whose own reads (a lookup and a state each) go to the driver in one trip.
READ_BATCH = 100
# Per-instance change lines logged between two yields when a batch lands.
LOG_BURST = 20


@dataclass
class SyncSummary:
    checked: int = 0
    changed: int = 0
    skipped: int = 0
    errors: int = 0
    duration_s: float = 0.0
    domains_stopped: int = 0
    foreign: int = 0
    unknown: int = 0
    unknown_domains: list[str] = field(default_factory=list)
    aborted: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Write:
    """A row write decided under the instance's lock, committed with others."""

    inst: AnyInstance
    values: dict[str, Any]
    expected: dict[str, Any]
    changes: list[Change]
    reason: str
    audit: list[dict[str, Any]]


@dataclass
class _Call:
    """One run or one single-instance sync: its summary and its pending writes.

    Per call, so that a forced sync of one instance never commits or counts
    the writes of a full run going on at the same time.
    """

    summary: SyncSummary = field(default_factory=SyncSummary)
    writes: list[_Write] = field(default_factory=list)
    since: float = 0.0
    # Given, a domain to stop is handed to it instead of being stopped here.
    defer_stop: Callable[[str], None] | None = None
    # The run's workers share the writes: under native threads (green.py) a
    # list swap must not interleave with another's.
    lock: Any = field(default_factory=green.native_lock)
    # Counts kept by the native thread that made them (each thread writes only
    # its own; a hub's greenthreads never switch inside a count), summed into
    # the summary by settle(). One shared lock per count had the run's workers
    # queue on it under threads, three times an instance.
    tallies: dict[int, dict[str, int]] = field(default_factory=dict)

    def count(self, **deltas: int) -> None:
        """Add ``deltas`` to the summary's counters once :meth:`settle` runs."""
        me = green.native_thread_id()
        tally = self.tallies.get(me)
        if tally is None:
            with self.lock:
                tally = self.tallies.setdefault(me, {})
        for name, delta in deltas.items():
            tally[name] = tally.get(name, 0) + delta

    def settle(self) -> SyncSummary:
        """The summary with every count so far added; call once the workers are done."""
        with self.lock:
            tallies, self.tallies = self.tallies, {}
        for tally in tallies.values():
            for name, delta in tally.items():
                setattr(self.summary, name, getattr(self.summary, name) + delta)
        return self.summary

    def add_write(self, write: _Write) -> None:
        with self.lock:
            if not self.writes:
                self.since = green.monotonic()
            self.writes.append(write)

    def take_writes(self, *, only_if_due: bool = False) -> list[_Write]:
        """The pending writes, now the caller's; with ``only_if_due``, only a full or old batch."""
        if not self.writes:
            return []  # the common case, without the lock; a write added now waits one turn
        with self.lock:
            due = len(self.writes) >= WRITE_BATCH or (
                bool(self.writes) and green.monotonic() - self.since >= WRITE_DELAY_S
            )
            if only_if_due and not due:
                return []
            writes, self.writes = self.writes, []
            return writes


class _Feed:
    """The run's instances, handed to its workers one at a time, with their reads.

    Reads are taken a batch (READ_BATCH instances) at a time, in one trip to
    the driver, by whichever worker finds the batch used up; the others wait
    for it on ``_turn``, a green semaphore (the read is a switch point, which
    the native ``_lock`` that guards the counters is never held across).
    """

    def __init__(
        self,
        instances: list[InstanceRecord],
        prefetched: dict[str, PowerState | None] | None,
        read_batch: Callable[[list[InstanceRecord]], dict[str, PowerState | None]],
    ) -> None:
        self._instances = instances
        self._read_batch = read_batch
        self._lock = green.native_lock()
        self._turn = green.Semaphore(1)
        # Every read already made (the bulk source): nothing to read ahead.
        self._reads: dict[str, PowerState | None] = prefetched or {}
        self._read_up_to = len(instances) if prefetched is not None else 0
        self.taken = 0  # instances handed out; those before _read_up_to have reads

    def next(self) -> tuple[InstanceRecord, dict[str, PowerState | None]] | None:
        while True:
            with self._lock:
                index = self.taken
                if index >= len(self._instances):
                    return None
                if index < self._read_up_to:
                    self.taken = index + 1
                    return self._instances[index], self._reads
            with self._turn:  # the batch is used up: one worker reads the next
                with self._lock:
                    start = self._read_up_to
                    due = self.taken >= start
                if due:
                    batch = self._instances[start : start + READ_BATCH]
                    reads = self._read_batch(batch)
                    with self._lock:
                        self._reads, self._read_up_to = reads, start + len(batch)


class Rechecks(Protocol):
    """Who syncs an instance again later, when a state the sync read may be passing.

    The lifecycle handler, while events are on: an event for the instance
    cancels or merges with the re-check. Without events, the sync's own timer.
    """

    def recheck(self, uuid: str, after: float) -> None:
        """Sync ``uuid`` again in ``after`` seconds (once, however often asked meanwhile)."""


# Told of the row writes that won, once per batch: (the row as read, the values written).
OnChanges = Callable[[list[tuple[AnyInstance, dict[str, Any]]]], None]


@dataclass(frozen=True)
class SyncStatistics:
    """The run under way (or the last one) and the last full run's unknown domains."""

    progress: tuple[int, int]  # (instances done, of how many)
    unknown_domains: int  # domains that belong to no instance of this host
    unknown_names: tuple[str, ...]  # the first of them, sorted
    unknown_checked_at: str | None  # when they were counted (UTC, ISO 8601)


class PowerSync(Rechecks):
    def __init__(
        self,
        db: Database,
        driver: ComputeDriver,
        host: str,
        locks: KeyedLocks,
        *,
        concurrency: int = 1,
        source: str = "get_info",
        action: str = sync_policy.ENFORCE,
        shutdown_timeout: float = 60,
        should_stop: Callable[[], bool] = lambda: False,
        watch: steady.SteadyWatch | None = None,
        rechecks: Rechecks | None = None,
        on_changes: OnChanges | None = None,
        resume_due: Callable[[], bool] = lambda: False,
    ) -> None:
        """``rechecks`` None: the sync's own timer re-checks. ``resume_due``: true
        while a resume after a host boot is due (pending, under way or to be
        tried again; ``BootResume.due``), when stops are held for it."""
        self.db = db
        self.driver = driver
        self.host = host
        self.locks = locks
        self.concurrency = max(1, concurrency)
        self.source = source
        self.action = action
        self.shutdown_timeout = shutdown_timeout
        self.should_stop = should_stop
        # Instances done by each worker of the run under way (or the last one):
        # one writer each, summed when read.
        self._done: list[int] = []
        self._total = 0
        # The last run's domains that belong to no instance: (count, names, when).
        self.unknown: tuple[int, list[str], str | None] = (0, [], None)
        # The "really stopped" rule; without one, a re-read counts at once.
        self.watch = watch if watch is not None else steady.SteadyWatch(0)
        self._rechecks: Rechecks = rechecks if rechecks is not None else self
        self._on_changes = on_changes
        self._resume_due = resume_due
        self._own_rechecks: set[str] = set()
        self._rechecks_lock = green.native_lock()

    @property
    def progress(self) -> tuple[int, int]:
        """(instances done, of how many) of the run under way, or of the last one."""
        return sum(self._done), self._total

    def statistics(self) -> SyncStatistics:
        count, names, checked_at = self.unknown
        return SyncStatistics(self.progress, count, tuple(names), checked_at)

    # -- entry points -----------------------------------------------------

    def run(self) -> SyncSummary:
        """Sync every instance of this host."""
        started = green.monotonic()
        call = _Call()
        summary = call.summary
        instances = self.db.instance_get_all_by_host(self.host)
        self._done, self._total = [], len(instances)
        try:
            self._count_unknown(instances, summary)
            prefetched = self._prefetch(instances) if self.source == "bulk" else {}
            self._run_all(instances, prefetched, call)
        except exception.Unavailable as exc:  # hypervisor or database: the run cannot go on
            summary.aborted = exc.described()
        finally:
            self._flush_writes(call)
            call.settle()
            summary.duration_s = round(green.monotonic() - started, 4)
            registry.count_sync(summary)
        self._log(summary, len(instances))
        return summary

    def sync_one(
        self,
        uuid: str,
        source: ActionSource = ActionSource.SYNC,
        defer_stop: Callable[[str], None] | None = None,
    ) -> SyncSummary:
        """Sync one instance now (a forced sync, or a lifecycle event).

        The row is read once the lock is held, so an operation that held the
        lock before is seen finished, not half-way. With ``defer_stop``, an
        instance whose domain must be stopped is handed to it and left as it
        is: a graceful stop can take ``shutdown_timeout`` seconds, which the
        caller may not want to spend in this call.
        """
        started = green.monotonic()
        call = _Call(defer_stop=defer_stop)
        summary = call.summary
        try:
            with self.locks.lock(uuid):
                try:
                    inst = self.db.instance_get(uuid, host=self.host)
                    self._handle_locked(inst, None, call, source)
                finally:
                    self._flush_writes(call)
        finally:
            call.settle()
            summary.duration_s = round(green.monotonic() - started, 4)
            registry.count_sync(summary)
        return summary

    def recheck(self, uuid: str, after: float) -> None:
        """:class:`Rechecks` by the sync's own timer (no events to merge with)."""
        with self._rechecks_lock:
            if uuid in self._own_rechecks:
                return
            self._own_rechecks.add(uuid)
        green.call_later(after, self._recheck, uuid, name=f"recheck-{uuid[:8]}")

    def _recheck(self, uuid: str) -> None:
        self._own_rechecks.discard(uuid)
        if self.should_stop():
            return
        try:
            self.sync_one(uuid)
        except exception.InstanceNotFound:
            pass
        except Exception as exc:  # noqa: BLE001 - the periodic sync is the safety net
            LOG.warning("re-check of instance %s failed: %s", uuid, exc)

    # -- the run ----------------------------------------------------------

    def _count_unknown(self, instances: list[InstanceRecord], summary: SyncSummary) -> None:
        claimed = {(i.domain_name, i.uuid.lower()) for i in instances}
        domains = self.driver.list_domains()
        unknown = sorted(d.name for d in domains if (d.name, d.uuid) not in claimed)
        summary.unknown = len(unknown)
        summary.unknown_domains = unknown[:MAX_LISTED_UNKNOWN]
        self.unknown = (len(unknown), summary.unknown_domains, utcnow().isoformat() + "Z")
        if unknown:
            LOG.info(
                "%d domain(s) on the hypervisor belong to no instance of this host: %s%s",
                len(unknown),
                ", ".join(unknown[:10]),
                " ..." if len(unknown) > 10 else "",
            )

    def _prefetch(self, instances: list[InstanceRecord]) -> dict[str, PowerState | None]:
        wanted = [i for i in instances if i.task_state is None]
        return self.driver.get_power_states(wanted)

    def _run_all(
        self,
        instances: list[InstanceRecord],
        prefetched: dict[str, PowerState | None],
        call: _Call,
    ) -> None:
        """Handle every instance with ``concurrency`` workers, each yielding after
        every instance. Per-instance reads are made a batch ahead (see _Feed)."""
        feed = _Feed(instances, prefetched if self.source == "bulk" else None, self._read_batch)
        count = min(self.concurrency, len(instances))
        done = [0] * count
        self._done = done
        workers = [
            green.spawn(self._work, feed, call, done, i, name="power-sync-worker")
            for i in range(count)
        ]
        try:
            for worker in workers:
                worker.wait()
        except BaseException:
            for worker in workers:
                worker.cancel()
            raise
        if call.summary.aborted is None and self.should_stop():
            call.summary.aborted = "agent stopping"

    def _work(self, feed: _Feed, call: _Call, done: list[int], me: int) -> None:
        """One worker: take the next instance until none is left or the run ends.

        ``done[me]`` counts the instances it finished (its own slot of the progress)."""
        summary = call.summary
        while summary.aborted is None and not self.should_stop():
            taken = None
            try:
                taken = feed.next()
                if taken is None:
                    return
                self._handle(taken[0], taken[1], call, ActionSource.SYNC, wait=False)
            except exception.Unavailable as exc:
                if summary.aborted is None:
                    summary.aborted = exc.described()
                return
            finally:
                if taken is not None:
                    done[me] += 1
                self._maybe_flush_writes(call)
                green.yield_now()

    def _read_batch(self, batch: list[InstanceRecord]) -> dict[str, PowerState | None]:
        """The batch's states, each instance looked up on its own, in one trip.

        Instances an operation holds (task_state set) are not read: they are
        skipped. A read taken a batch ahead is at most one batch old; a row
        changed meanwhile loses its compare-and-set write, and a state that
        needs a second look is read again under the lock (the steady rule).
        """
        return self.driver.power_states_each(i for i in batch if i.task_state is None)

    # -- one instance -----------------------------------------------------

    def _handle(
        self,
        inst: InstanceRecord,
        prefetched: dict[str, PowerState | None] | None,
        call: _Call,
        source: ActionSource,
        wait: bool = True,
    ) -> None:
        """Sync one instance under its lock. ``wait=False`` skips an instance
        whose lock is taken: an operation holds it and writes the state itself."""
        if inst.task_state is not None or (not wait and self.locks.busy(inst.uuid)):
            call.count(skipped=1)
            return
        with self.locks.lock(inst.uuid):
            self._handle_locked(inst, prefetched, call, source)

    def _handle_locked(
        self,
        inst: AnyInstance,
        prefetched: dict[str, PowerState | None] | None,
        call: _Call,
        source: ActionSource,
    ) -> None:
        if inst.task_state is not None:
            call.count(skipped=1)
            return
        try:
            outcome = self._sync_locked(inst, prefetched, call, source)
        except exception.Unavailable:
            raise
        except exception.ForeignDomain as exc:
            call.count(errors=1, foreign=1)
            LOG.error("instance %s: %s", inst.uuid, exc)
            return
        except Exception as exc:  # noqa: BLE001 - one instance must never abort the run
            call.count(errors=1)
            LOG.warning(
                "power sync of instance %s failed: %s: %s", inst.uuid, type(exc).__name__, exc
            )
            return
        if outcome == SKIPPED:
            call.count(skipped=1)
            return
        call.count(checked=1)

    def _read(self, inst: AnyInstance) -> PowerState | None:
        return self.driver.power_state(inst)

    def _maybe_flush_writes(self, call: _Call) -> None:
        self._commit(call, call.take_writes(only_if_due=True))

    def _flush_writes(self, call: _Call) -> None:
        self._commit(call, call.take_writes())

    def _commit(self, call: _Call, writes: list[_Write]) -> None:
        """Commit the decided writes; each wins only if its row is unchanged since read."""
        if not writes:
            return
        try:
            outcomes = self.db.instance_compare_and_set_many(
                [(w.inst, w.values, w.expected, w.audit) for w in writes]
            )
        except Exception as exc:  # noqa: BLE001 - counted; the next sync writes them again
            LOG.error("could not write %d power-sync updates: %s", len(writes), exc)
            call.count(errors=len(writes), checked=-len(writes))
            return
        won_writes: list[tuple[AnyInstance, dict[str, Any]]] = []
        for logged, (write, won) in enumerate(zip(writes, outcomes, strict=True), 1):
            if logged % LOG_BURST == 0:
                green.yield_now()
            if not won:
                LOG.info(
                    "instance %s changed while being synced; left for the next sync",
                    write.inst.uuid,
                )
                continue
            won_writes.append((write.inst, write.values))
            LOG.info(
                "instance %s: %s (%s)",
                write.inst.uuid,
                ", ".join(f"{c.field} {c.old} -> {c.new}" for c in write.changes),
                write.reason,
            )
        lost = len(writes) - len(won_writes)
        call.count(changed=len(won_writes), checked=-lost, skipped=lost)
        if won_writes and self._on_changes is not None:
            self._on_changes(won_writes)

    def _sync_locked(
        self,
        inst: AnyInstance,
        prefetched: dict[str, PowerState | None] | None,
        call: _Call,
        source: ActionSource,
    ) -> str:
        """Sync one instance under its lock; return CHANGED, UNCHANGED or SKIPPED."""
        if prefetched is not None and inst.uuid in prefetched:
            observed = prefetched[inst.uuid]
        else:
            observed = self._read(inst)
        decision = sync_policy.decide(inst.vm_state, observed, self.action)
        if decision.recheck:
            decision = self._recheck_steady(inst)
        if decision.vm_state is VmState.STOPPED and self._resume_due():
            decision = self._held_for_resume(inst, decision)
        reason = f"hypervisor reports {decision.power_state}"
        audit_stop: Change | None = None
        if decision.stop_domain:
            if not self._still_as_loaded(inst):
                return SKIPPED
            if call.defer_stop is not None:
                call.defer_stop(inst.uuid)
                return SKIPPED
            LOG.warning(
                "instance %s is %s in the database but %s on the hypervisor: stopping it",
                inst.uuid,
                inst.vm_state,
                decision.power_state,
            )
            suspended = decision.power_state is PowerState.SUSPENDED
            self.driver.power_off(inst, timeout=0 if suspended else self.shutdown_timeout)
            call.count(domains_stopped=1)
            before = decision.power_state
            observed = self._read(inst)
            decision = sync_policy.Decision(
                PowerState.NOSTATE if observed is None else observed, decision.vm_state
            )
            reason = f"domain was {before}; stopped by the sync"
            # The stop is audited even when the row already said shutdown.
            audit_stop = Change("power_state", before.value, decision.power_state.value)
        if decision.warning:
            LOG.warning("instance %s: %s", inst.uuid, decision.warning)
            reason = decision.warning
        values: dict[str, Any] = {"power_state": decision.power_state.value}
        if decision.vm_state is not None:
            values["vm_state"] = decision.vm_state.value
        changes = diff(inst, values)
        if not changes and audit_stop is None:
            return UNCHANGED
        # The row's updated_at is its version: every writer bumps it, so the
        # write loses to any change made since this sync read the row.
        expected = {"task_state": None, "updated_at": inst.updated_at}
        audited = changes
        if audit_stop is not None and all(c.field != "power_state" for c in changes):
            audited = [audit_stop, *changes]
        audit = action_rows(inst.uuid, audited, "power_sync", source, reason, utcnow())
        call.add_write(_Write(inst, values, expected, audited, reason, audit))
        return CHANGED

    def _recheck_steady(self, inst: AnyInstance) -> sync_policy.Decision:
        """Read again and decide with the steady rule; not steady yet: power_state
        only, and the instance is synced again once the state could count."""
        observed = self._read(inst)
        counts = self.watch.observe(inst.uuid, observed)
        decision = sync_policy.decide(inst.vm_state, observed, self.action, rechecked=counts)
        if not decision.recheck:
            return decision
        after = self.watch.remaining(inst.uuid) + steady.POLL_S / 5
        LOG.info(
            "instance %s is %s in the database and %s on the hypervisor: checked again in %.1f s",
            inst.uuid,
            inst.vm_state,
            decision.power_state,
            after,
        )
        self._rechecks.recheck(inst.uuid, after)
        return sync_policy.Decision(decision.power_state)

    @staticmethod
    def _held_for_resume(inst: AnyInstance, decision: sync_policy.Decision) -> sync_policy.Decision:
        """power_state only: the resume after a host boot starts the guests it finds active.

        Recorded stopped (or stopped) now, the pass would refuse it as no
        longer active and the guest would stay off. Checked under the
        instance's lock right before the decision, with no gate to pass:
        ``due`` is set before any sync can run and, once cleared by a
        complete pass, never set again, so a stop decided while it was clear
        cannot land during a pass. The sync that follows the pass decides.
        """
        LOG.info(
            "instance %s is %s in the database and %s on the hypervisor: left so, "
            "the resume after host boot is due",
            inst.uuid,
            inst.vm_state,
            decision.power_state,
        )
        return sync_policy.Decision(decision.power_state)

    def _still_as_loaded(self, inst: AnyInstance) -> bool:
        """Before touching a domain, make sure the row did not move since it was loaded."""
        try:
            fresh = self.db.instance_get(inst.uuid, host=self.host)
        except exception.InstanceNotFound:
            return False
        return fresh.task_state is None and fresh.updated_at == inst.updated_at

    @staticmethod
    def _log(summary: SyncSummary, total: int) -> None:
        LOG.info(
            "power sync of %d instances: %d checked, %d changed, %d skipped, %d errors, "
            "%d unknown domains in %.3f s%s",
            total,
            summary.checked,
            summary.changed,
            summary.skipped,
            summary.errors,
            summary.unknown,
            summary.duration_s,
            f" (aborted: {summary.aborted})" if summary.aborted else "",
        )
