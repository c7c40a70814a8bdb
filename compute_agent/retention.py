"""Retention: the agent purges its host's dead rows by itself ([database] purge_*_after_days).

A periodic task in its own greenthread runs the same purge as
``compute-agent-manage db purge`` (``db/purge.py``), restricted to this
host, in small batches with a pause between them: the other tasks, the
requests and the heartbeat go first, and a batch's database calls run off
the hub (SQLite) or on green sockets (a server). A stopping agent ends the
run between two batches; the next run takes up the rest.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from compute_agent import exception, green
from compute_agent.db.api import Database
from compute_agent.db.purge import PurgeCounts, Purger, cut_before
from compute_agent.utils import utcnow

LOG = logging.getLogger(__name__)

# Seconds between runs once enabled: dead rows pile up over days, not minutes.
INTERVAL = 3600.0
# Rows per transaction, and the pause after each: at most about
# BATCH / PAUSE rows a second (2,000), well above what a busy host writes.
BATCH = 100
PAUSE = 0.05


@dataclass
class RetentionSummary:
    """One run: what it removed, how long it took, and why it ended early if it did."""

    instances: int = 0
    instance_actions: int = 0
    live_instance_actions: int = 0
    left: int = 0
    batches: int = 0
    duration_s: float = 0.0
    aborted: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class RetentionStatistics:
    """The settings, totals since start, and the last run (``status``, ``/metrics``)."""

    deleted_after_days: int
    actions_after_days: int
    runs: int
    last_run_at: str | None
    totals: dict[str, int]
    last_run: dict[str, Any] | None


class Retention:
    def __init__(
        self,
        db: Database,
        host: str,
        *,
        deleted_after_days: int = 0,
        actions_after_days: int = 0,
        batch: int = BATCH,
        pause: float = PAUSE,
        should_stop: Callable[[], bool] = lambda: False,
    ) -> None:
        for name, days in (
            ("purge_deleted_after_days", deleted_after_days),
            ("purge_actions_after_days", actions_after_days),
        ):
            if isinstance(days, bool) or not isinstance(days, int) or days < 0:
                raise exception.InvalidInput(f"{name} must be 0 or more days, not {days!r}")
        self.db = db
        self.host = host
        self.deleted_after_days = deleted_after_days
        self.actions_after_days = actions_after_days
        self.batch = batch
        self.pause = pause
        self.should_stop = should_stop
        self.runs = 0
        self.totals = PurgeCounts()
        self.last: RetentionSummary | None = None
        self.last_at: str | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.deleted_after_days or self.actions_after_days)

    @property
    def interval(self) -> float:
        """The periodic task's interval: 0 (on demand only) while nothing is to be purged."""
        return INTERVAL if self.enabled else 0.0

    def run(self) -> RetentionSummary:
        started = green.monotonic()
        self.last_at = utcnow().isoformat(timespec="seconds") + "Z"
        counts = PurgeCounts()
        summary = RetentionSummary()
        purger = Purger(
            self.db,
            batch=self.batch,
            host=self.host,
            pause=self.pause,
            should_stop=self.should_stop,
        )
        now = utcnow()
        try:
            if self.deleted_after_days:
                counts.add(purger.purge_deleted(cut_before(self.deleted_after_days, now)))
            if self.actions_after_days and not self.should_stop():
                counts.add(purger.purge_actions(cut_before(self.actions_after_days, now)))
        except exception.Unavailable as exc:
            summary.aborted = exc.described()
        finally:
            if self.should_stop() and summary.aborted is None:
                summary.aborted = "agent stopping"
            for name, value in counts.as_dict().items():
                setattr(summary, name, value)
            summary.duration_s = round(green.monotonic() - started, 4)
            self.totals.add(counts)
            self.runs += 1
            self.last = summary
        if counts.rows or summary.aborted:
            LOG.info(
                "purged %d deleted instance(s), %d of their audit rows and %d old audit rows "
                "of live instances in %.1f s%s",
                counts.instances,
                counts.instance_actions,
                counts.live_instance_actions,
                summary.duration_s,
                f" (ended early: {summary.aborted})" if summary.aborted else "",
            )
        return summary

    def statistics(self) -> RetentionStatistics:
        last = self.last
        return RetentionStatistics(
            deleted_after_days=self.deleted_after_days,
            actions_after_days=self.actions_after_days,
            runs=self.runs,
            last_run_at=self.last_at,
            totals=self.totals.as_dict(),
            last_run=last.as_dict() if last is not None else None,
        )
