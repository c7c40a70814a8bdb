"""Periodic tasks, each in its own greenthread so that no task can delay another.

Scheduling is start-to-start: a task with a 10 s interval that takes 3 s
starts again 7 s after it ends; one that takes 12 s starts again at once,
never overlapping itself. A task can be asked to run now: requests arriving
while it runs are coalesced into one extra run, and every caller gets a
future that resolves when the run covering its request has finished.
"""

from __future__ import annotations

import logging
import random
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from compute_agent import exception, green
from compute_agent.metrics import registry
from compute_agent.utils import utcnow

LOG = logging.getLogger(__name__)


# In the error tree now (category "stopping"); the old name stays importable here.
TaskStopped = exception.TaskStopped


@dataclass(frozen=True)
class TaskStatistics:
    """What an operator reads about one periodic task."""

    name: str
    interval: float
    enabled: bool
    running: bool
    runs: int
    failures: int
    last_start: str | None
    last_duration_s: float | None
    last_error: str | None
    next_run_in_s: float | None
    max_lateness_s: float


@dataclass(frozen=True)
class RunnerStatistics:
    """Every task's statistics, in the order the tasks were added."""

    tasks: tuple[TaskStatistics, ...]


class PeriodicTask:
    """One callable, run every ``interval`` seconds in its own greenthread.

    An interval of zero or less disables the schedule; the task still runs
    when asked with :meth:`run_now`.
    """

    def __init__(
        self,
        name: str,
        fn: Callable[[], Any],
        interval: float,
        *,
        initial_delay: float = 0.0,
        clock: Callable[[], float] = green.monotonic,
    ) -> None:
        self.name = name
        self.fn = fn
        self.interval = float(interval)
        self.initial_delay = max(0.0, initial_delay)
        self._clock = clock
        self._wake = green.Event()
        self._pending: list[green.Future] = []
        # run_now() comes from request threads: a request must never be added
        # after stop() failed the pending ones (it would wait for ever).
        self._pending_guard = green.native_lock()
        self._stopping = False
        self._thread: green.Task | None = None
        self._next_due: float | None = None
        self.running = False
        self.runs = 0
        self.failures = 0
        self.last_start_wall: str | None = None
        self.last_duration: float | None = None
        self.last_error: str | None = None
        self.last_result: Any = None
        self.max_lateness = 0.0
        self._streak = 0

    @property
    def enabled(self) -> bool:
        return self.interval > 0

    @property
    def stopped(self) -> bool:
        return self._stopping

    # -- control ----------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = green.spawn(self._loop, name=self.name)

    def run_now(self) -> green.Future:
        """Ask for a run as soon as possible; the future resolves after it.

        The future's result is the task's return value, or the task's
        exception. If a run is in progress it may have started before this
        request, so the request is covered by the next run instead.
        """
        fut = green.Future()
        with self._pending_guard:
            stopping = self._stopping
            if not stopping:
                self._pending.append(fut)
        if stopping:
            fut.set_exception(TaskStopped(f"task {self.name} is stopping"))
            return fut
        self._wake.set()
        return fut

    def stop(self, grace: float) -> None:
        """Stop scheduling; let a running call finish for up to ``grace`` s."""
        with self._pending_guard:
            self._stopping = True
        self._wake.set()
        thread = self._thread
        if thread is None:
            return
        try:
            thread.result(grace)
        except TimeoutError:
            LOG.warning(
                "task %s did not finish within %.1f s of stop; cancelling", self.name, grace
            )
            thread.cancel()
        finally:
            self._fail_pending(TaskStopped(f"task {self.name} stopped"))

    # -- the loop ---------------------------------------------------------

    def _loop(self) -> None:
        now = self._clock()
        self._next_due = now + self.initial_delay if self.enabled else None
        while not self._stopping:
            timeout = None if self._next_due is None else max(0.0, self._next_due - self._clock())
            if not self._pending:
                self._wake.wait(timeout)
            self._wake.clear()
            if self._stopping:
                break
            now = self._clock()
            due = self._next_due is not None and now >= self._next_due
            if not (due or self._pending):
                continue
            if due and self._next_due is not None:
                self.max_lateness = max(self.max_lateness, now - self._next_due)
            with self._pending_guard:
                waiters, self._pending = self._pending, []
            self._run_once(waiters)

    def _run_once(self, waiters: list[green.Future]) -> None:
        start = self._clock()
        if self.enabled:
            self._next_due = start + self.interval
        self.running = True
        self.last_start_wall = utcnow().isoformat(timespec="milliseconds") + "Z"
        error: BaseException | None = None
        result: Any = None
        try:
            result = self.fn()
        except green.Cancelled:
            self._fail_waiters(waiters, TaskStopped(f"task {self.name} cancelled"))
            raise
        except Exception as exc:  # noqa: BLE001 - a task's failure must not end its loop
            error = exc
            self.failures += 1
            self.last_error = f"{type(exc).__name__}: {exc}"
            self._streak += 1
            if self._streak == 1 and isinstance(exc, exception.ComputeAgentError):
                # A typed outage (hypervisor or database away) says all in one line.
                LOG.error("periodic task %s failed: %s", self.name, self.last_error)
            elif self._streak == 1:
                LOG.error(
                    "periodic task %s failed:\n%s", self.name, traceback.format_exc().rstrip()
                )
            else:
                # One line per repeat: an outage must not bury the log in tracebacks.
                LOG.error(
                    "periodic task %s failed again (%d in a row): %s",
                    self.name,
                    self._streak,
                    self.last_error,
                )
        finally:
            self.running = False
            self.runs += 1
            self.last_duration = self._clock() - start
            registry.TASK_DURATION.observe((self.name,), self.last_duration)
        if error is None:
            if self._streak:
                LOG.info("periodic task %s recovered after %d failures", self.name, self._streak)
            self._streak = 0
            self.last_error = None
            self.last_result = result
        for fut in waiters:
            if error is None:
                fut.set_result(result)
            else:
                fut.set_exception(error)

    def _fail_waiters(self, waiters: list[green.Future], exc: Exception) -> None:
        for fut in waiters:
            fut.set_exception(exc)

    def _fail_pending(self, exc: Exception) -> None:
        with self._pending_guard:
            waiters, self._pending = self._pending, []
        self._fail_waiters(waiters, exc)

    # -- statistics ----------------------------------------------------------

    def statistics(self) -> TaskStatistics:
        next_in = None
        if self._next_due is not None and not self._stopping:
            next_in = round(max(0.0, self._next_due - self._clock()), 3)
        return TaskStatistics(
            name=self.name,
            interval=self.interval,
            enabled=self.enabled,
            running=self.running,
            runs=self.runs,
            failures=self.failures,
            last_start=self.last_start_wall,
            last_duration_s=None if self.last_duration is None else round(self.last_duration, 4),
            last_error=self.last_error,
            next_run_in_s=next_in,
            max_lateness_s=round(self.max_lateness, 4),
        )


class PeriodicRunner:
    """Owns the agent's periodic tasks: starts them, stops them in order."""

    def __init__(self, fuzzy_delay: float = 0.0, rng: random.Random | None = None) -> None:
        self.fuzzy_delay = fuzzy_delay
        self._rng = rng or random.Random()
        self.tasks: dict[str, PeriodicTask] = {}

    def add(
        self, name: str, fn: Callable[[], Any], interval: float, *, fuzzy: bool = True
    ) -> PeriodicTask:
        if name in self.tasks:
            raise ValueError(f"periodic task {name} already added")
        delay = self._rng.uniform(0, self.fuzzy_delay) if fuzzy and self.fuzzy_delay else 0.0
        task = PeriodicTask(name, fn, interval, initial_delay=delay)
        self.tasks[name] = task
        return task

    def start(self) -> None:
        for task in self.tasks.values():
            task.start()
        LOG.info(
            "started periodic tasks: %s",
            ", ".join(
                f"{t.name} every {t.interval:g}s" if t.enabled else f"{t.name} (on demand)"
                for t in self.tasks.values()
            ),
        )

    def run_now(self, name: str) -> green.Future:
        try:
            task = self.tasks[name]
        except KeyError:
            raise KeyError(f"no periodic task named {name}") from None
        return task.run_now()

    def stop(self, grace: float, keep: tuple[str, ...] = ()) -> None:
        """Stop every task not named in ``keep``, all at once.

        Tasks stop concurrently, so stopping takes at most about ``grace``
        however many tasks there are. Call again without ``keep`` to stop the
        rest.
        """
        stopping = [t for t in self.tasks.values() if t.name not in keep and not t.stopped]
        stoppers = [green.spawn(t.stop, grace, name=f"stop-{t.name}") for t in stopping]
        for gt in stoppers:
            gt.wait()

    def statistics(self) -> RunnerStatistics:
        return RunnerStatistics(tuple(t.statistics() for t in list(self.tasks.values())))
