"""Lifecycle events, turned into syncs of the instance concerned.

The driver hands each event to :meth:`LifecycleHandler.on_event` on the hub;
it never blocks there. An event does not say what to write: it only says
which instance to look at now, and the same per-instance sync routine as
the periodic task reads the hypervisor again under the instance's lock, so
a stale or repeated event changes nothing. Several events for one instance
waiting together make one sync.

A STOPPED event waits: a guest reboot emits STOPPED then STARTED, and
acting on the STOPPED alone would record a rebooting guest as stopped (and,
with the enforcing policy, could have it stopped). Any later event for the
same domain cancels the wait. Every event also restarts the clock of the
"really stopped" rule (``compute_agent.steady``): a STOPPED event counts as
the domain seen shut off at that moment, so the sync after the delay can
record it as stopped if it is still so; a sync that sees a passing state
too early asks for a re-check (:meth:`LifecycleHandler.recheck`), which is
delayed, coalesced and cancelled exactly like a STOPPED event.

So the power sync and this handler call each other, each through a named
protocol it is given when built: the handler is built with the sync, as an
:class:`InstanceSync`; the sync is built with its ``power_sync.Rechecks``,
the manager, which hands each re-check to this handler while events are on.

Event syncs run a few at a time, on at most ``concurrency`` worker tasks
that take queued syncs oldest first: a burst of events is a queue, not a
task per event (under native threads, a thread each). A sync that finds a
domain to stop (a stopped instance started behind the agent's back) hands
the stop to a greenthread of its own, so a guest taking its time to shut
down holds up no other instance's events.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from compute_agent import exception, green, steady
from compute_agent.counters import Counters
from compute_agent.power_sync import Rechecks, SyncSummary
from compute_agent.states import ActionSource, PowerState
from compute_agent.virt.events import LifecycleEvent, Transition

LOG = logging.getLogger(__name__)

# Transitions that are held back, and cancelled by any later event.
DELAYED = frozenset({Transition.STOPPED, Transition.UNDEFINED})
# What a transition says the domain became, for the steady rule's clock.
STATE_AFTER = {
    Transition.STOPPED: PowerState.SHUTDOWN,
    Transition.CRASHED: PowerState.CRASHED,
    Transition.PAUSED: PowerState.PAUSED,
}


@dataclass(frozen=True)
class EventStatistics:
    """What became of the lifecycle events received since start."""

    received: int = 0
    synced: int = 0
    delayed: int = 0
    cancelled: int = 0
    coalesced: int = 0
    ignored: int = 0
    not_ours: int = 0
    stops: int = 0
    rechecks: int = 0
    errors: int = 0
    last_latency_s: float | None = None


class InstanceSync(Protocol):
    """What the handler drives: the sync of one instance (``PowerSync.sync_one``)."""

    def sync_one(
        self,
        uuid: str,
        source: ActionSource = ActionSource.SYNC,
        defer_stop: Callable[[str], None] | None = None,
    ) -> SyncSummary: ...


class LifecycleHandler(Rechecks):
    """Events in, syncs out; also the power sync's :class:`Rechecks` while events are on.

    The power sync asks it to look at an instance again (a state it read may
    be passing); the handler runs that look like a delayed STOPPED event, so
    a real event for the instance cancels or merges with it.
    """

    def __init__(
        self,
        syncs: InstanceSync,
        *,
        stopped_delay: float,
        concurrency: int = 4,
        is_stopping: Callable[[], bool] = lambda: False,
        watch: steady.SteadyWatch | None = None,
    ) -> None:
        self._syncs = syncs
        self._watch = watch
        self.stopped_delay = stopped_delay
        self._is_stopping = is_stopping
        self.concurrency = max(1, concurrency)
        self._delayed: dict[str, green.Task] = {}
        # Queued syncs, oldest first (one per instance: later events merge
        # into it), the instances whose sync runs now, and the workers alive.
        # Invariant: a queued sync whose instance's sync runs is taken by that
        # worker when it is done, so no queued sync is left without a worker.
        self._ready: collections.deque[tuple[str, LifecycleEvent]] = collections.deque()
        self._queued: set[str] = set()
        self._running: set[str] = set()
        self._workers = 0
        self._stoppers: set[green.Task] = set()
        self._stopped = False  # stop() was called: take nothing more
        # Guards the above: event callbacks, delayed calls and workers may be
        # different threads (held briefly, never across a switch).
        self._guard = green.native_lock()
        self.counters = Counters(EventStatistics)

    def statistics(self) -> EventStatistics:
        return self.counters.snapshot()

    def on_event(self, event: LifecycleEvent) -> None:
        """Take one event, on the hub; schedules work and returns at once."""
        if self._ending():
            self.counters.add(received=1, ignored=1)
            LOG.debug(
                "ignoring %s event for %s: the agent is stopping", event.transition, event.name
            )
            return
        uuid = event.uuid.lower()
        LOG.debug("lifecycle event %s for %s (%s)", event.transition, event.name, uuid)
        with self._guard:
            self.counters.add(received=1)
            pending = self._delayed.pop(uuid, None)
        if pending is not None:
            pending.cancel()
            self.counters.add(cancelled=1)
            LOG.info(
                "instance %s: pending stop event cancelled by a later %s event",
                uuid,
                event.transition,
            )
        if self._watch is not None:
            self._watch.event(uuid, STATE_AFTER.get(event.transition))
        if event.transition in DELAYED and self.stopped_delay > 0:
            with self._guard:
                if self._stopped:
                    self.counters.add(ignored=1)
                    return
                self.counters.add(delayed=1)
                self._delayed[uuid] = green.call_later(
                    self.stopped_delay, self._delay_over, uuid, event
                )
            return
        self._submit(uuid, event)

    def recheck(self, uuid: str, after: float) -> None:
        """Sync ``uuid`` again in ``after`` s, unless an event comes first.

        The sync asks for it when a state it read may be passing; a delayed
        sync already pending for the instance serves the same purpose.
        """
        uuid = uuid.lower()
        if self._ending():
            return
        event = LifecycleEvent(uuid, uuid, Transition.STOPPED, "re-check")
        with self._guard:
            if uuid in self._delayed or self._stopped:
                return
            self.counters.add(rechecks=1)
            self._delayed[uuid] = green.call_later(after, self._delay_over, uuid, event)

    def _delay_over(self, uuid: str, event: LifecycleEvent) -> None:
        # Submitted first: ``pending`` never reads zero in between.
        self._submit(uuid, event)
        with self._guard:
            if self._delayed.get(uuid) is green.current_task():
                del self._delayed[uuid]  # not a later event's delay

    def _submit(self, uuid: str, event: LifecycleEvent) -> None:
        with self._guard:
            if self._stopped:  # checked again here: stop() may have run since
                self.counters.add(ignored=1)
                return
            if uuid in self._queued:
                self.counters.add(coalesced=1)
                return
            self._queued.add(uuid)
            self._ready.append((uuid, event))
            if self._workers >= self.concurrency:
                return  # a busy worker takes it
            self._workers += 1
        try:
            green.spawn(self._work, name="event-sync")
        except BaseException:
            with self._guard:
                self._workers -= 1
            raise

    def _work(self) -> None:
        """Run queued syncs until none is left that another worker's instance holds up."""
        item: tuple[str, LifecycleEvent] | None = None
        try:
            while True:
                with self._guard:
                    if item is not None:
                        self._running.discard(item[0])
                    item = self._take()
                    if item is None:
                        return
                self._sync(*item)
        finally:
            with self._guard:
                if item is not None:
                    self._running.discard(item[0])
                self._workers -= 1

    def _take(self) -> tuple[str, LifecycleEvent] | None:
        """The oldest queued sync of an instance not being synced now (guard held).

        One event sync per instance at a time: a queued one stays queued (new
        events merge into it) until the one before it is done. It skips at
        most ``concurrency`` entries, one per running instance.
        """
        for i, (uuid, event) in enumerate(self._ready):
            if uuid not in self._running:
                del self._ready[i]
                self._queued.discard(uuid)
                self._running.add(uuid)
                return uuid, event
        return None

    def _sync(self, uuid: str, event: LifecycleEvent) -> None:
        # From here, a new event for this instance needs a sync of its own:
        # this one may read the hypervisor before the change.
        if self._ending():
            self.counters.add(ignored=1)
            return
        try:
            self._syncs.sync_one(uuid, ActionSource.EVENT, defer_stop=self._stop_outside_slots)
        except exception.InstanceNotFound:
            self.counters.add(not_ours=1)
            LOG.debug(
                "%s event for domain %s: no instance of this host", event.transition, event.name
            )
            return
        except Exception as exc:  # noqa: BLE001 - the periodic sync is the safety net
            self.counters.add(errors=1)
            LOG.warning("sync after %s event for %s failed: %s", event.transition, uuid, exc)
            return
        latency = round(green.monotonic() - event.received, 4)
        self.counters.add(synced=1)
        self.counters.set(last_latency_s=latency)

    def _stop_outside_slots(self, uuid: str) -> None:
        self.counters.add(stops=1)
        # Spawned outside the guard (under threads a start waits for the GIL);
        # the callback, added after, discards it even if it has already ended.
        # Meanwhile the calling worker's sync keeps ``pending`` above zero.
        stopper = green.spawn(self._enforce, uuid, name=f"event-stop-{uuid[:8]}")
        with self._guard:
            self._stoppers.add(stopper)
        stopper.add_done_callback(self._stopper_done)

    def _stopper_done(self, stopper: green.Task) -> None:
        with self._guard:
            self._stoppers.discard(stopper)

    def _enforce(self, uuid: str) -> None:
        """Sync again, stopping the domain inline; the per-instance lock still rules."""
        if self._ending():
            return
        try:
            self._syncs.sync_one(uuid, ActionSource.EVENT)
        except Exception as exc:  # noqa: BLE001 - the periodic sync is the safety net
            self.counters.add(errors=1)
            LOG.warning("stopping %s after an event failed: %s", uuid, exc)

    @property
    def pending(self) -> int:
        """Events waiting out their delay, plus syncs queued or running, and stops."""
        with self._guard:
            return len(self._delayed) + len(self._ready) + len(self._running) + len(self._stoppers)

    def stop(self, grace: float = 0.0) -> None:
        """Drop delayed and queued events; wait up to ``grace`` s for the syncs running.

        A sync in flight is let finish, not cut: after this the manager
        closes the libvirt connection and the service the database, under
        it (a worker left running then waited 30 s for a connection of a
        pool disposed under it).
        """
        with self._guard:
            self._stopped = True
            delayed = list(self._delayed.values())
            self._delayed.clear()
            dropped = len(self._ready)
            self._ready.clear()
            self._queued.clear()
        for task in delayed:
            task.cancel()
        if dropped:
            self.counters.add(ignored=dropped)
        deadline = green.monotonic() + grace
        while self.running and green.monotonic() < deadline:
            green.sleep(0.01)
        if self.running:
            LOG.warning("%d event sync(s) still running at stop; stopping anyway", self.running)

    @property
    def running(self) -> int:
        """Syncs and enforced stops running now."""
        with self._guard:
            return len(self._running) + len(self._stoppers)

    def _ending(self) -> bool:
        return self._stopped or self._is_stopping()
