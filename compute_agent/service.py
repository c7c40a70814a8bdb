"""The long-running node service: start everything, run, stop everything in order."""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from oslo_config import cfg

from compute_agent import concurrency, exception, green, servicegroup
from compute_agent.db.api import Database
from compute_agent.db.busy import BusyWaiter
from compute_agent.db.models import Service as ServiceRow
from compute_agent.hub_monitor import HubLagMonitor, LagStatistics
from compute_agent.ownership import new_token
from compute_agent.periodic import PeriodicRunner, PeriodicTask, TaskStatistics
from compute_agent.rpc import BINARY
from compute_agent.utils import freeze_long_lived_objects

LOG = logging.getLogger(__name__)

HEARTBEAT = "heartbeat"
# The share of report_interval a heartbeat waits for its write: the task
# stays on schedule however slow the database is.
HEARTBEAT_WAIT = 0.8
# The agent's exit status when another agent took its service row: it
# stopped writing, and systemd sees a failure rather than a clean stop.
EXIT_DISPLACED = 3
# How long the stop waits for its write of the row (it takes milliseconds).
STOP_WRITE_WAIT = 5.0


class Component(Protocol):
    """Something the service starts after the heartbeat and stops before it."""

    def start(self, service: NodeService) -> None: ...

    def stop(self) -> None: ...


@dataclass(frozen=True)
class ServiceStatistics:
    """The heartbeat, the periodic tasks and the hub's lag, as ``status`` and metrics show them."""

    started_at: float  # monotonic: when the service claimed its row
    heartbeat_at: float | None  # monotonic: the last heartbeat written, None before the first
    disabled: bool  # the row's ``disabled``, as this agent set it
    tasks: tuple[TaskStatistics, ...]
    hub_lag: LagStatistics


class NodeService:
    """Heartbeat, periodic tasks, hub-lag monitor, and the components on top.

    Start order: service row, hub-lag monitor, components (which register
    their periodic tasks), then every periodic task. Stop order: periodic
    tasks but the heartbeat, components in reverse, the heartbeat, the row.
    """

    def __init__(
        self,
        conf: cfg.ConfigOpts,
        db: Database,
        components: list[Component] | None = None,
        *,
        owner: str | None = None,
        predecessor: str | tuple[str, ...] | None = None,
    ) -> None:
        self.conf = conf
        self.db = db
        self.host: str = conf.host
        self.components = list(components or [])
        self.runner = PeriodicRunner(fuzzy_delay=conf.periodic_fuzzy_delay)
        self.lag_monitor = HubLagMonitor(conf.hub_lag_interval, conf.hub_lag_warning)
        self.row: ServiceRow | None = None
        self.stopping = False
        self._stop_requested = green.Event()
        # Set by a start step's end or a stop request, whichever comes first.
        self._step_over: green.Event | None = None
        self._given_up: green.Task | None = None  # the start step a stop request left
        # A claim between its last look at the stop request and storing its
        # row: the stop waits for it (see _claim_goes_ahead).
        self._claim_guard = green.native_lock()
        self._claim_committing = False
        self._stopped = False
        self._heartbeat_write: green.Task | None = None
        self._heartbeat_started = 0.0
        # The token this process claims the service row with (ownership.py),
        # and the one its lock file inherited from the last agent on it.
        self.owner = owner or new_token()
        self.predecessor = predecessor
        self.displaced = False
        self.exit_status = 0
        self.last_heartbeat: float | None = None  # monotonic: claimed or last written
        # For the metrics: read from the scrape's native thread, written on the hub.
        self.started_at_mono = green.monotonic()
        self.heartbeat_at: float | None = None  # monotonic, last heartbeat written
        self.disabled = False  # mirrors the row's ``disabled``, as this agent set it

    # -- life cycle -------------------------------------------------------

    def claim(self) -> None:
        """Claim this host's service row; ServiceOwned, writing nothing, if a live agent has it.

        Stopping, writing nothing, if a stop was requested before the claim
        could commit: a claim the start gave up waiting for (a row locked
        elsewhere) went on in its native thread and committed after the
        agent had stopped, leaving the row claimed and not marked stopped.
        """
        row = self.db.service_start(
            self.host,
            BINARY,
            self.owner,
            down_time=self.conf.service_down_time,
            predecessor=self.predecessor,
            before_commit=self._claim_goes_ahead,
        )
        with self._claim_guard:
            self.row = row
            self._claim_committing = False
        self.last_heartbeat = self.started_at_mono = green.monotonic()
        self.disabled = bool(row.disabled)

    def _claim_goes_ahead(self) -> None:
        """The claim's last look at a stop request, in its transaction, before the commit.

        Under the guard, so that either the claim sees the request and is
        undone, or the stop sees a claim committing and waits for its row.
        """
        with self._claim_guard:
            if self._stop_requested.is_set():
                raise exception.Stopping("stop requested while claiming the service row")
            self._claim_committing = True

    def release_claim(self) -> None:
        """Give the row back (mark it stopped) when start fails right after the claim."""
        if self.row is not None:
            self.db.service_stopped(self.row.id, self.owner)
            self.row = None

    def start(self) -> None:
        if self.row is None:
            self.claim()
        assert self.row is not None
        # Logged here, not at the claim: a start refused after the claim
        # (a socket that cannot be bound) stays one line.
        choice = concurrency.chosen()
        LOG.info(
            "compute-agent starting on host %s (service id %d, owner %s, database %s, "
            "concurrency backend %s from %s)",
            self.host,
            self.row.id,
            self.owner[:8],
            self.db.safe_url,
            green.BACKEND,
            choice.source,
        )
        self.lag_monitor.start()
        # The heartbeat is never delayed by the fuzzy start: a new service must
        # look alive at once.
        self.runner.add(HEARTBEAT, self.heartbeat, self.conf.report_interval, fuzzy=False)
        for component in self.components:
            if self._stop_requested.is_set():
                # A step given up by run_start_step returned later (a call
                # that cannot be cancelled): start nothing after a stop.
                LOG.info(
                    "stop requested: %s and what follows not started", type(component).__name__
                )
                return
            component.start(self)
        if self._stop_requested.is_set():
            return
        self.runner.start()
        freeze_long_lived_objects()

    def run_start_step(self, what: str, step: Callable[[], object], *, cancel: bool = True) -> bool:
        """Run one step of the start in a task; True once it ended, False if a stop came first.

        A step can wait on a silent dependency for its whole deadline (a
        hung libvirtd's open: 20 s by default; a claim meeting its row
        locked elsewhere: the 30 s statement deadline), and a SIGTERM then
        waited with it, to end as a failure where a stop was asked for.
        Now a stop request ends the wait at once and cancels the step; a
        step blocked in a C call sees the cancel when the call returns,
        and the start checks for a stop between its components. A step's
        error is raised here; False also when a stop came while it ran.
        ``cancel=False`` leaves the step running to the process's exit (the
        claim: under eventlet a killed greenthread would leave its native
        commit unwatched; the claim undoes itself when it sees the request).
        """
        over = green.Event()
        self._step_over = over  # request_stop sets it from here on
        if self._stop_requested.is_set():
            return False
        task = green.submit(step, name="start-step")
        task.add_done_callback(lambda _task: over.set())
        while not over.wait(0.5):
            pass
        if task.done():
            if self._stop_requested.is_set():
                with contextlib.suppress(exception.Stopping):  # the step saw the request
                    task.result()
                return False
            task.result()
            return True
        LOG.info("stop requested while %s: the start is given up", what)
        if cancel:
            task.cancel()
        self._given_up = task
        return False

    def add_periodic(
        self, name: str, fn: Callable[[], Any], interval: float, *, fuzzy: bool = True
    ) -> PeriodicTask:
        """Register a periodic task; components call this from ``start``."""
        return self.runner.add(name, fn, interval, fuzzy=fuzzy)

    def request_stop(self, reason: str = "") -> None:
        """Ask the service to stop; safe to call from a signal handler."""
        if not self._stop_requested.is_set():
            LOG.info("stop requested%s", f" ({reason})" if reason else "")
        self.stopping = True
        self._stop_requested.set()
        if (over := self._step_over) is not None:
            over.set()

    def wait(self, poll: float = 0.5) -> None:
        """Block the calling greenthread until a stop is requested."""
        while not self._stop_requested.wait(poll):
            pass

    def stop(self) -> None:
        """Stop in order; each step bounded so the whole stop takes seconds."""
        if self._stopped:
            return
        self._stopped = True
        self.stopping = True
        grace = self.conf.graceful_shutdown_timeout
        started = green.monotonic()
        # Tasks first (they use the components), then components, then the
        # heartbeat, so the host looks alive until it says it stopped.
        self.runner.stop(grace, keep=(HEARTBEAT,))
        for component in reversed(self.components):
            try:
                component.stop()
            except Exception:
                LOG.exception("error stopping %s", type(component).__name__)
        self.runner.stop(grace)
        self.lag_monitor.stop()
        with self._claim_guard:
            committing = self._claim_committing
        if (left := self._given_up) is not None and not left.done():
            if committing:  # its commit is under way: the row is marked stopped below
                with contextlib.suppress(Exception, green.Cancelled):
                    left.result(STOP_WRITE_WAIT)
            else:
                LOG.info(
                    "a start step is still in a call that cannot be cancelled; not waiting for it"
                )
        if self.row is not None and not self.displaced:
            self._mark_stopped()
        self.db.dispose()
        gc.unfreeze()
        LOG.info("compute-agent stopped in %.2f s", green.monotonic() - started)

    def _mark_stopped(self) -> None:
        """Write the row's stop, waiting for it at most STOP_WRITE_WAIT s.

        A lock on the row, or workers that still hold every pooled
        connection on a silent server (native threads cannot be cancelled),
        held the stop for the whole statement deadline or the pool's wait:
        30 s and more, past systemd's TimeoutStopSec with a longer deadline.
        Unwritten, the row goes down by its heartbeat's age.
        """
        assert self.row is not None
        writing = green.submit(self.db.service_stopped, self.row.id, self.owner, name="stop-write")
        try:
            writing.result(STOP_WRITE_WAIT)
        except TimeoutError:
            LOG.error(
                "could not mark the service stopped: no answer within %.0f s; "
                "the row goes down when its heartbeat is %.0f s old",
                STOP_WRITE_WAIT,
                self.conf.service_down_time,
            )
        except Exception as exc:  # noqa: BLE001 - the DB may be the reason we stop
            LOG.error("could not mark the service stopped: %s", exc)

    # -- the heartbeat ----------------------------------------------------

    def heartbeat(self) -> int:
        """Write the heartbeat, waiting for it at most HEARTBEAT_WAIT of an interval.

        A database that stops answering holds its write for up to its
        deadlines (seconds); waited for, that made the heartbeat task itself
        seconds late. The write goes on in its own greenthread instead, this
        run fails on time with one line, and no second write starts while
        the first still waits.
        """
        assert self.row is not None
        pending = self._heartbeat_write
        if pending is not None and not pending.done():
            raise exception.DatabaseUnavailable(
                f"database unavailable: the heartbeat written {self._since_write():.1f} s ago "
                "is still waiting for an answer"
            )
        self._heartbeat_started = green.monotonic()
        wait = self.conf.report_interval * HEARTBEAT_WAIT
        write = green.submit(self._write_heartbeat, self.row.id, wait, name="heartbeat-write")
        self._heartbeat_write = write
        try:
            write.result(wait)
        except TimeoutError:
            raise exception.DatabaseUnavailable(
                f"database unavailable: no answer to the heartbeat within {wait:.1f} s"
            ) from None
        except exception.OwnershipLost as exc:
            self._displaced(str(exc))
            return self.row.report_count
        self.row.report_count += 1
        self.last_heartbeat = self.heartbeat_at = green.monotonic()
        LOG.info("heartbeat %d", self.row.report_count)
        return self.row.report_count

    def _write_heartbeat(self, row_id: int, budget: float) -> object:
        """The heartbeat's UPDATE; a refusal for load (too many clients) retried within ``budget``.

        A busy database then costs the heartbeat a few seconds, not a
        missed beat: the host does not look down because others connected.
        """
        busy = BusyWaiter(budget, first_pause=min(0.5, budget / 8), max_pause=budget / 2)
        return busy.call("heartbeat", lambda: self.db.service_heartbeat(row_id, self.owner))

    def _displaced(self, holder: str) -> None:
        """Another agent claimed the row: say so once, write nothing more, stop.

        Stopping (rather than idling) hands the decision to whoever
        supervises the agent; the exit status says why.
        """
        if self.displaced:
            return
        self.displaced = True
        self.exit_status = EXIT_DISPLACED
        LOG.error(
            "ownership of host %s lost: %s; this agent (owner %s) stops writing and exits",
            self.host,
            holder,
            self.owner[:8],
        )
        self.request_stop("ownership lost")

    def status(self) -> str:
        """One line for ``systemctl status``: what the agent is doing now."""
        if self.displaced:
            return f"host {self.host}: ownership lost to another agent; stopping"
        if self.stopping:
            return f"host {self.host}: stopping"
        if self.row is None:
            return f"host {self.host}: starting"
        age = green.monotonic() - (self.last_heartbeat or 0.0)
        text = f"host {self.host}: heartbeat {self.row.report_count} ({age:.0f} s ago)"
        for component in self.components:
            extra = getattr(component, "status", None)
            if callable(extra) and (line := extra()):
                text += f", {line}"
        return text

    def statistics(self) -> ServiceStatistics:
        return ServiceStatistics(
            started_at=self.started_at_mono,
            heartbeat_at=self.heartbeat_at,
            disabled=self.disabled,
            tasks=self.runner.statistics().tasks,
            hub_lag=self.lag_monitor.statistics(),
        )

    def _since_write(self) -> float:
        return green.monotonic() - self._heartbeat_started

    def is_up(self) -> bool:
        row = self.db.service_get(self.host, BINARY)
        return row is not None and servicegroup.is_up(row, self.conf.service_down_time)
