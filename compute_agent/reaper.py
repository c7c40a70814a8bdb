"""Guests of deleted instances: found, and reaped, shut off, logged or ignored.

A domain can outlive its instance: the row was soft-deleted behind the
agent's back, a delete raced an out-of-band start, an operator restored a
definition. Every sync then lists it as "unknown" and nobody acts on it
while it holds memory and CPU. This periodic task lists the host's domains
once, looks their names up among the soft-deleted instances of this host in
one database call, and acts on a domain only if its name *and* UUID are a
deleted instance's: a domain of someone else is never touched.

Each domain is handled under its instance's lock (skipped if busy) and read
again just before acting, so a domain that went or changed hands meanwhile
is left alone. A run handles at most ``max_per_run`` domains and yields
after each; one domain's failure is counted, never the end of the run.
Domains take turns across runs (those handled longest ago first): leftovers
that stay (already off, a destroy that keeps failing) never keep the others
out of the bound.
Every action but ``noop`` writes an ``instance_actions`` row.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from compute_agent import exception, green
from compute_agent.db.api import Change, Database, InstanceRecord, action_rows
from compute_agent.guest_ops import destroy_until_gone
from compute_agent.locks import KeyedLocks
from compute_agent.states import ActionSource, PowerState
from compute_agent.utils import utcnow
from compute_agent.virt.driver import ComputeDriver

LOG = logging.getLogger(__name__)

REAP, SHUTDOWN, LOG_ONLY, NOOP = "reap", "shutdown", "log", "noop"
ACTIONS = (REAP, SHUTDOWN, LOG_ONLY, NOOP)
AUDIT_ACTION = "running_deleted"
# What the audit row's new_value says each action did to the domain.
DONE = {REAP: "reaped", SHUTDOWN: "shut-off", LOG_ONLY: "logged"}
# States in which a guest uses no CPU: ``shutdown`` has nothing to do.
OFF = frozenset({PowerState.SHUTDOWN, PowerState.CRASHED, PowerState.NOSTATE})
# Domain names listed in a run's summary, at most.
MAX_LISTED = 100
# Outcomes of one domain, each a counter of the summary.
COUNTERS = (
    "found",
    "reaped",
    "shut_down",
    "logged",
    "ignored",
    "already_off",
    "skipped",
    "foreign",
    "errors",
    "deferred",
)


@dataclass
class ReapSummary:
    """One run: what was found and what became of it."""

    action: str
    found: int = 0  # domains whose name and UUID are a deleted instance's
    reaped: int = 0
    shut_down: int = 0
    logged: int = 0
    ignored: int = 0  # noop
    already_off: int = 0  # shutdown: the guest was off already
    skipped: int = 0  # instance lock busy, or the domain gone before it was acted on
    foreign: int = 0  # the UUID had changed when the domain was read again
    errors: int = 0
    deferred: int = 0  # over max_per_run: left for the next run
    duration_s: float = 0.0
    aborted: str | None = None
    domains: list[str] = field(default_factory=list)  # acted on (or ignored)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ReaperStatistics:
    """The action, totals since start, and the last run (its counters, without its domains)."""

    action: str
    max_per_run: int
    runs: int
    last_run_at: str | None
    totals: dict[str, int]
    last_run: dict[str, Any] | None


class DeletedGuestReaper:
    def __init__(
        self,
        db: Database,
        driver: ComputeDriver,
        host: str,
        locks: KeyedLocks,
        *,
        action: str = REAP,
        max_per_run: int = 50,
        should_stop: Callable[[], bool] = lambda: False,
    ) -> None:
        if action not in ACTIONS:
            raise exception.InvalidInput(
                f"running_deleted_instance_action must be one of {', '.join(ACTIONS)}, "
                f"not {action!r}"
            )
        if isinstance(max_per_run, bool) or not isinstance(max_per_run, int) or max_per_run < 1:
            raise exception.InvalidInput(
                f"running_deleted_instance_max_per_run must be a positive integer, "
                f"not {max_per_run!r}"
            )
        self.db = db
        self.driver = driver
        self.host = host
        self.locks = locks
        self.action = action
        self.max_per_run = max_per_run
        self.should_stop = should_stop
        self.runs = 0
        self.totals: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self.last: ReapSummary | None = None
        self.last_at: str | None = None
        # uuid -> the run that last handled its domain, for leftovers still there.
        self._turns: dict[str, int] = {}

    # -- the run ----------------------------------------------------------

    def run(self) -> ReapSummary:
        """Look once through the host's domains; act on those of deleted instances."""
        started = green.monotonic()
        summary = ReapSummary(self.action)
        try:
            self._run(summary)
        except exception.Unavailable as exc:  # hypervisor or database, each in its own name
            summary.aborted = exc.described()
        finally:
            summary.duration_s = round(green.monotonic() - started, 4)
            self._record(summary)
        self._log(summary)
        return summary

    def _run(self, summary: ReapSummary) -> None:
        domains = self.driver.list_domains()
        if not domains:
            return
        deleted = self.db.instance_get_deleted_by_domain_names(self.host, [d.name for d in domains])
        by_key = {(r.domain_name, r.uuid.lower()): r for r in deleted}
        # Name and UUID both: a domain that only shares a name is not ours.
        matched = [
            by_key[(d.name, d.uuid.lower())] for d in domains if (d.name, d.uuid.lower()) in by_key
        ]
        summary.found = len(matched)
        summary.deferred = max(0, len(matched) - self.max_per_run)
        # Never handled first, then the longest ago; the sort is stable (listing order).
        turns = {i.uuid: self._turns[i.uuid] for i in matched if i.uuid in self._turns}
        self._turns = turns  # forget domains that are gone
        matched.sort(key=lambda i: turns.get(i.uuid, -1))
        todo = matched[: self.max_per_run]
        for done, inst in enumerate(todo):
            if self.should_stop():
                summary.aborted = "agent stopping"
                summary.deferred += len(todo) - done
                return
            turns[inst.uuid] = self.runs
            try:
                self._handle(inst, summary)
            finally:
                green.yield_now()

    def _handle(self, inst: InstanceRecord, summary: ReapSummary) -> None:
        if self.locks.busy(inst.uuid):
            LOG.info("instance %s: busy; its leftover domain is left for the next run", inst.uuid)
            summary.skipped += 1
            return
        with self.locks.lock(inst.uuid):
            try:
                outcome = self._act_locked(inst, summary)
            except exception.Unavailable:
                raise
            except exception.ForeignDomain as exc:
                summary.foreign += 1
                LOG.error("deleted instance %s: %s", inst.uuid, exc)
                return
            except Exception as exc:  # noqa: BLE001 - one domain must never end the run
                summary.errors += 1
                LOG.warning(
                    "deleted instance %s: %s of its domain %s failed: %s: %s",
                    inst.uuid,
                    self.action,
                    inst.domain_name,
                    type(exc).__name__,
                    exc,
                )
                return
        setattr(summary, outcome, getattr(summary, outcome) + 1)
        if outcome not in ("skipped", "already_off") and len(summary.domains) < MAX_LISTED:
            summary.domains.append(inst.domain_name)

    def _act_locked(self, inst: InstanceRecord, summary: ReapSummary) -> str:
        """Read the domain again, act, audit; return the summary counter to bump."""
        state = self.driver.power_state(inst)  # ForeignDomain if it changed hands
        if state is None:
            return "skipped"  # gone meanwhile: nothing left to do
        what = (
            f"domain {inst.domain_name} of instance {inst.uuid} (deleted {_when(inst)}) "
            f"is still on the hypervisor, {state}"
        )
        if self.action == NOOP:
            LOG.debug("%s; left alone (running_deleted_instance_action = noop)", what)
            return "ignored"
        if self.action == LOG_ONLY:
            LOG.warning("%s; left alone (running_deleted_instance_action = log)", what)
            self._audit(inst, state, summary)
            return "logged"
        if self.action == SHUTDOWN:
            if state in OFF:
                return "already_off"
            LOG.warning("%s: forcing it off", what)
            self.driver.power_off(inst, timeout=0)
            self._audit(inst, state, summary)
            return "shut_down"
        LOG.warning("%s: reaping it", what)
        destroy_until_gone(self.driver, inst)
        self._audit(inst, state, summary)
        return "reaped"

    def _audit(self, inst: InstanceRecord, state: PowerState, summary: ReapSummary) -> None:
        """One audit row; a failed write is counted and logged, the action stands."""
        note = Change("domain", state.value, DONE[self.action])
        reason = f"guest of a deleted instance; running_deleted_instance_action = {self.action}"
        rows = action_rows(
            inst.uuid, [note], AUDIT_ACTION, str(ActionSource.SYNC), reason, utcnow()
        )
        try:
            self.db.actions_add(rows)
        except Exception as exc:  # noqa: BLE001 - the domain was dealt with; say so
            summary.errors += 1
            LOG.error(
                "deleted instance %s: domain %s %s, but its audit row was not written: %s",
                inst.uuid,
                inst.domain_name,
                DONE[self.action],
                exc,
            )

    # -- figures ----------------------------------------------------------

    def _record(self, summary: ReapSummary) -> None:
        self.runs += 1
        for name in COUNTERS:
            self.totals[name] += getattr(summary, name)
        self.last = summary
        self.last_at = utcnow().isoformat(timespec="milliseconds") + "Z"

    def statistics(self) -> ReaperStatistics:
        last = None
        if self.last is not None:
            last = {k: v for k, v in self.last.as_dict().items() if k not in ("action", "domains")}
        return ReaperStatistics(
            action=self.action,
            max_per_run=self.max_per_run,
            runs=self.runs,
            last_run_at=self.last_at,
            totals=dict(self.totals),
            last_run=last,
        )

    @staticmethod
    def _log(summary: ReapSummary) -> None:
        acted = summary.reaped + summary.shut_down + summary.logged + summary.ignored
        busy = summary.reaped + summary.shut_down + summary.logged + summary.errors
        level = logging.WARNING if busy or summary.foreign else logging.INFO
        LOG.log(
            level,
            "guests of deleted instances: %d found, %d handled (%s), %d skipped, %d foreign, "
            "%d errors, %d deferred in %.3f s%s",
            summary.found,
            acted,
            summary.action,
            summary.skipped + summary.already_off,
            summary.foreign,
            summary.errors,
            summary.deferred,
            summary.duration_s,
            f" (aborted: {summary.aborted})" if summary.aborted else "",
        )


def _when(inst: InstanceRecord) -> str:
    return (
        inst.deleted_at.isoformat(timespec="seconds") + "Z"
        if inst.deleted_at
        else "at an unknown time"
    )
