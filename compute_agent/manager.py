"""The compute manager: what this host does for its instances, by delegation.

It owns the driver and the per-instance locks, and hands the work to the
modules that hold it: ``power_sync`` (the periodic sync and the sync of one
instance), ``lifecycle`` (events), ``operations`` (build, stop, start,
reboot, delete), ``stats`` (sampling), ``reaper`` (guests of deleted
instances), ``recovery`` (operations an earlier process left half-done) and
``resume`` (guests that ran before a host boot). It registers the periodic
tasks with the service, and reacts to the hypervisor connection going and
coming: the service is disabled with an ``AUTO:`` reason while libvirt is
away (an operator's own disable is never touched), and a full sync follows
its return, since events may have been lost meanwhile.

It builds each component with its collaborators as constructor arguments,
and stands between the power sync and the event handler, which call each
other: it is the sync's ``Rechecks`` while events are on (docs/architecture.md,
"How the components are tied together").

Every request method takes plain values (as RPC and the admin socket
deliver them), validates them, and returns plain dicts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from oslo_config import cfg

from compute_agent import exception, green, servicegroup, steady
from compute_agent.db.api import AnyInstance, Database
from compute_agent.db.models import Instance
from compute_agent.lifecycle import EventStatistics, LifecycleHandler
from compute_agent.locks import KeyedLocks
from compute_agent.metrics.instances import InstanceIndex
from compute_agent.operations import BuildStatistics, InstanceOperations
from compute_agent.power_sync import PowerSync, Rechecks, SyncStatistics, SyncSummary
from compute_agent.reaper import DeletedGuestReaper, ReaperStatistics, ReapSummary
from compute_agent.recovery import recover_interrupted
from compute_agent.resume import BootResume, ResumeStatistics
from compute_agent.retention import Retention, RetentionStatistics
from compute_agent.rpc import BINARY
from compute_agent.service import NodeService
from compute_agent.states import ActionSource
from compute_agent.stats import SamplerStatistics, StatsSampler
from compute_agent.utils import printable, utcnow
from compute_agent.virt.driver import ComputeDriver, DriverStatistics
from compute_agent.virt.spec import validate_uuid

LOG = logging.getLogger(__name__)

POWER_SYNC = "power_sync"
# The most audit rows one request returns.
MAX_ACTIONS = 1000
STATS = "stats"
REAPER = "running_deleted"
PURGE = "db_purge"
AUTO_PREFIX = "AUTO:"
# How long start-up recovery and the resume pass wait before trying again
# after the database failed them (the hypervisor's return retries them itself).
RESUME_RETRY_S = 10.0


@dataclass(frozen=True)
class ManagerStatistics:
    """Each component's :meth:`statistics`, taken together (``status``, metrics)."""

    connected: bool  # the driver holds a connection to the hypervisor
    driver: DriverStatistics | None  # None: the driver has no connection to describe
    events: EventStatistics | None  # None: lifecycle events are not handled
    builds: BuildStatistics
    resume: ResumeStatistics
    power_sync: SyncStatistics
    reaper: ReaperStatistics
    stats: SamplerStatistics
    retention: RetentionStatistics


def action_dict(row: Any) -> dict[str, Any]:
    """One audit row as the CLI shows it."""
    return {
        "id": row.id,
        "created_at": row.created_at.isoformat() + "Z" if row.created_at else None,
        "action": row.action,
        "field": row.field,
        "old_value": row.old_value,
        "new_value": row.new_value,
        "source": row.source,
        "reason": row.reason,
    }


def instance_dict(inst: AnyInstance) -> dict[str, Any]:
    """An instance as RPC and the admin CLI show it."""
    return {
        "uuid": inst.uuid,
        "name": inst.display_name,
        "host": inst.host,
        "vm_state": inst.vm_state,
        "task_state": inst.task_state,
        "power_state": inst.power_state,
        "vcpus": inst.vcpus,
        "memory_mb": inst.memory_mb,
        "updated_at": inst.updated_at.isoformat() + "Z" if inst.updated_at else None,
    }


class ComputeManager(Rechecks):
    def __init__(self, conf: cfg.ConfigOpts, db: Database, driver: ComputeDriver) -> None:
        self.conf = conf
        self.db = db
        self.driver = driver
        self.host: str = conf.host
        self.locks = KeyedLocks()
        self.service: NodeService | None = None
        self.started_at = utcnow()
        self._recovered = False
        self._recovery: green.Task | None = None
        self._again = False  # a reconnection came while the recovery thread ran
        self._recovering = False  # the recovery thread runs (or is about to)
        # _again and _recovering are one decision: "go round once more" or "done".
        self._recovery_guard = green.native_lock()
        compute = conf.compute
        # The one "really stopped" rule, shared by the sync, events and operations.
        delay = conf.libvirt.lifecycle_event_delay
        self.steady = steady.SteadyWatch(delay)
        # The host's instances for the metrics: each statistics cycle's list,
        # corrected at once by the power sync's writes.
        self.instance_index = InstanceIndex()
        self.operations = InstanceOperations(
            db,
            driver,
            self.host,
            self.locks,
            name_template=compute.instance_name_template,
            shutdown_timeout=compute.shutdown_timeout,
            max_concurrent_builds=compute.max_concurrent_builds,
            steady_delay=delay,
            watch=self.steady,
        )
        self.resume = BootResume(
            db,
            driver,
            self.operations,
            self.host,
            enabled=compute.resume_guests_state_on_host_boot,
            state_path=conf.state_path,
            boot_id_path=compute.host_boot_id_path,
            concurrency=compute.max_concurrent_builds,
            should_stop=self._stopping,
        )
        # The sync and the event handler call each other: the handler syncs the
        # instance of an event; the sync asks for a re-check of a passing state,
        # which this manager routes to the handler (recheck below).
        events_on = compute.handle_lifecycle_events
        self.power_sync = PowerSync(
            db,
            driver,
            self.host,
            self.locks,
            concurrency=compute.sync_power_state_concurrency,
            source=compute.power_sync_source,
            action=compute.power_sync_action,
            shutdown_timeout=compute.shutdown_timeout,
            should_stop=self._stopping,
            watch=self.steady,
            rechecks=self if events_on else None,
            on_changes=self.instance_index.update_many,
            resume_due=lambda: self.resume.due,
        )
        self.events: LifecycleHandler | None = None
        if events_on:
            self.events = LifecycleHandler(
                self.power_sync,
                stopped_delay=delay,
                concurrency=compute.sync_power_state_concurrency,
                is_stopping=self._stopping,
                watch=self.steady,
            )
        self.reaper = DeletedGuestReaper(
            db,
            driver,
            self.host,
            self.locks,
            action=compute.running_deleted_instance_action,
            max_per_run=compute.running_deleted_instance_max_per_run,
            should_stop=self._stopping,
        )
        self.stats = StatsSampler(
            db,
            driver,
            self.host,
            call_timeout=compute.stats_call_timeout,
            unresponsive_after=compute.stats_unresponsive_after,
            concurrency=compute.sync_power_state_concurrency,
            on_instances=self.instance_index.replace,
        )
        database = conf.database
        self.retention = Retention(
            db,
            self.host,
            deleted_after_days=database.purge_deleted_after_days,
            actions_after_days=database.purge_actions_after_days,
            should_stop=self._stopping,
        )

    def recheck(self, uuid: str, after: float) -> None:
        """The power sync's :class:`Rechecks` while events are on: the event handler's.

        It runs the re-check like a delayed STOPPED event, so an event for
        the instance meanwhile cancels or merges with it.
        """
        assert self.events is not None, "built with rechecks=self only while events are on"
        self.events.recheck(uuid, after)

    # -- component life cycle ---------------------------------------------

    def start(self, service: NodeService) -> None:
        self.service = service
        # First: the sync holds stops while a resume is due, so it must be known due
        # before anything (a connection, an event) can start a sync.
        self.resume.check_boot()
        self.driver.add_connection_listener(self._on_connection)
        if self.events is not None:
            self.driver.set_event_listener(self.events.on_event)
        else:
            LOG.info("lifecycle events are off: changes are seen by the periodic sync only")
        try:
            self.driver.init_host(self.host)
        except exception.HypervisorUnavailable as exc:
            LOG.error("starting without the hypervisor, retrying in the background: %s", exc)
        else:
            self._set_auto_disabled(False, None)
            self._start_recovery()
        compute = self.conf.compute
        threads = green.native_threads()
        if compute.max_concurrent_builds == 0 or compute.max_concurrent_builds > threads:
            LOG.warning(
                "max_concurrent_builds %s: at most %d builds can call the hypervisor at once "
                "(native_thread_pool_size)",
                compute.max_concurrent_builds or "unlimited",
                threads,
            )
        service.add_periodic(POWER_SYNC, self._power_sync, compute.sync_power_state_interval)
        if compute.stats_interval > 0:
            service.add_periodic(STATS, self.stats.run, compute.stats_interval)
        # Registered even when its interval disables the schedule: it can be run on demand.
        service.add_periodic(
            REAPER, self.reaper.run, compute.running_deleted_instance_poll_interval
        )
        # Registered when off too (interval 0): its figures show it never ran.
        service.add_periodic(PURGE, self.retention.run, self.retention.interval)

    def stop(self) -> None:
        self._stop_resume()
        if self.events is not None:
            self.events.stop(self.conf.graceful_shutdown_timeout)
        self.driver.set_event_listener(None)
        self.driver.cleanup_host()

    def _stopping(self) -> bool:
        return self.service is not None and self.service.stopping

    def _stop_resume(self) -> None:
        """End a resume pass within the stop's grace: started guests finish, no new one starts."""
        self.resume.stop()
        thread = self._recovery
        # Recovery alone is left as before (the process ends without it);
        # a pass sees the stop within a poll and ends.
        if thread is None or thread.done() or not self.resume.running:
            return
        try:
            thread.result(self.conf.graceful_shutdown_timeout)
        except TimeoutError:
            LOG.warning("start-up recovery/resume still running at stop; cancelling it")
            thread.cancel()

    def _power_sync(self) -> SyncSummary:
        """The periodic sync, after the resume pass: it would record resumable guests stopped."""
        if not self.resume.wait_done(self._stopping):
            return SyncSummary(aborted="the agent is stopping")
        return self.power_sync.run()

    # -- hypervisor connection --------------------------------------------

    def _on_connection(self, up: bool, reason: str) -> None:
        if self._stopping():
            return
        if up:
            # The resume gate first: the service write yields, and a sync
            # let through meanwhile would record the guests to resume stopped.
            self._start_recovery()
            self._set_auto_disabled(False, None)
            LOG.info("hypervisor back (%s): running a full power sync", reason)
            if self.service is not None and POWER_SYNC in self.service.runner.tasks:
                self.service.runner.run_now(POWER_SYNC)
        else:
            self._set_auto_disabled(True, f"{AUTO_PREFIX} hypervisor connection lost: {reason}")

    def _set_auto_disabled(self, disabled: bool, reason: str | None) -> None:
        if self.service is None or self.service.row is None:
            return
        try:
            changed = self.db.service_set_disabled(
                self.service.row.id, disabled, reason, only_if_reason_prefix=AUTO_PREFIX
            )
        except Exception as exc:  # noqa: BLE001 - the DB may be down too; the next event retries
            LOG.error("could not %s the service: %s", "disable" if disabled else "enable", exc)
            return
        if changed:
            self.service.disabled = disabled
        if changed and disabled:
            LOG.warning("service disabled: %s", reason)

    def _start_recovery(self) -> None:
        """Settle what an earlier process left half-done, then resume after a host boot.

        Once each (until it completes), one run at a time. The resume gate
        is closed here, before the thread runs, so that a sync asked for
        right after (on reconnection) waits for the pass. A reconnection
        while the thread still runs (a failed pass waiting for starts in
        flight) has it go round once more instead: nothing else would.
        """
        with self._recovery_guard:
            if self._recovering:
                self._again = True
                return
            if self._recovered and not self.resume.due:
                return
            self._recovering = True
        self.resume.prepare()
        self._recovery = green.spawn(self._recover, name="startup-recovery")

    def _recover(self) -> None:
        """Recovery then the pass; tried again while the database fails them.

        A hypervisor outage is retried by its reconnection; a database one
        has no such signal, so it is retried here, the resume gate held shut
        meanwhile: the sync would record the guests still to resume stopped.
        """
        try:
            while not self._stopping():
                with self._recovery_guard:
                    self._again = False
                if self._recover_once():
                    with self._recovery_guard:
                        if not (self._again and self.driver.connected):
                            self._finish_recovery()
                            return
                    continue  # the hypervisor came back while this ran
                LOG.warning(
                    "database unavailable: recovery/resume tried again in %s s", RESUME_RETRY_S
                )
                end = green.monotonic() + RESUME_RETRY_S
                while green.monotonic() < end and not self._stopping():
                    green.sleep(min(0.2, RESUME_RETRY_S))
        finally:
            with self._recovery_guard:
                if self._recovering:
                    self._finish_recovery()

    def _finish_recovery(self) -> None:
        """Under the guard: open the gate and let the next reconnection start a run."""
        self.resume.release()
        self._recovering = False

    def _recover_once(self) -> bool:
        """One attempt; False if the database failed it and it is worth another."""
        if not self._recovered:
            try:
                recover_interrupted(self.db, self.driver, self.host, self.locks, self.started_at)
            except exception.DatabaseUnavailable as exc:
                LOG.error("start-up recovery interrupted: %s", exc)
                return False
            except Exception as exc:  # noqa: BLE001 - retried when the hypervisor comes back
                LOG.error("start-up recovery interrupted, retried on reconnection: %s", exc)
                return True
            self._recovered = True
        if self._stopping():
            return True
        return not self.resume.run_pass()

    # -- requests: instances ----------------------------------------------

    def build_instance(
        self, instance: Any, source: ActionSource = ActionSource.RPC
    ) -> dict[str, Any]:
        return self._indexed(self.operations.build(instance, source))

    def start_instance(
        self, instance_uuid: Any, source: ActionSource = ActionSource.RPC
    ) -> dict[str, Any]:
        return self._indexed(self.operations.start(instance_uuid, source))

    def stop_instance(
        self, instance_uuid: Any, source: ActionSource = ActionSource.RPC
    ) -> dict[str, Any]:
        return self._indexed(self.operations.stop(instance_uuid, source))

    def reboot_instance(
        self, instance_uuid: Any, hard: Any = False, source: ActionSource = ActionSource.RPC
    ) -> dict[str, Any]:
        return self._indexed(self.operations.reboot(instance_uuid, hard, source))

    def delete_instance(
        self, instance_uuid: Any, source: ActionSource = ActionSource.RPC
    ) -> dict[str, Any]:
        inst = self.operations.delete(instance_uuid, source)
        self.stats.store.forget(inst.uuid)
        self.instance_index.remove(inst.uuid)
        return instance_dict(inst)

    def _indexed(self, inst: Instance) -> dict[str, Any]:
        """An operation's result, noted in the metrics' index at once."""
        self.instance_index.update(inst)
        return instance_dict(inst)

    def get_instance_info(self, instance_uuid: Any) -> dict[str, Any]:
        uuid = validate_uuid(instance_uuid, "instance_uuid")
        return instance_dict(self.db.instance_get(uuid, host=self.host))

    def get_instance_actions(self, instance_uuid: Any, limit: Any = 100) -> list[dict[str, Any]]:
        """The audit trail of an instance, the latest ``limit`` rows, oldest first.

        A deleted instance keeps its trail, so only an instance with no rows
        at all must still be one of this host's.
        """
        uuid = validate_uuid(instance_uuid, "instance_uuid")
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_ACTIONS:
            raise exception.InvalidInput(
                f"limit must be an integer from 1 to {MAX_ACTIONS}, not {printable(limit)}"
            )
        rows = self.db.actions_get(uuid, limit)
        if not rows:
            self.db.instance_get(uuid, host=self.host)  # InstanceNotFound if not ours
        return [action_dict(r) for r in reversed(rows)]

    def set_service_disabled(self, disabled: Any, reason: Any = None) -> dict[str, Any]:
        """The operator's enable or disable of this host's service.

        An operator's disable always wins: it replaces an automatic one, and
        the automatic enable (libvirt back) never undoes it, because its
        reason does not start with AUTO_PREFIX. An enable while the
        hypervisor is away leaves the automatic disable in place, which
        clears itself when the hypervisor comes back.
        """
        if not isinstance(disabled, bool):
            raise exception.InvalidInput(
                f"disabled must be true or false, not {printable(disabled)}"
            )
        if reason is not None:
            if not isinstance(reason, str) or not reason.strip() or len(reason) > 255:
                raise exception.InvalidInput("reason must be a text of 1 to 255 characters")
            if not reason.isprintable():
                raise exception.InvalidInput(
                    "reason must be printable text (no control characters)"
                )
            # In any case: the automatic enable matches the prefix with SQL
            # LIKE, which SQLite and MariaDB compare without case, so an
            # operator's "auto: disk swap" was lifted when libvirt came back.
            if reason.upper().startswith(AUTO_PREFIX.upper()):
                raise exception.InvalidInput(
                    f"reason may not start with {AUTO_PREFIX!r}: the agent uses it for the "
                    "disables it lifts by itself"
                )
            if not disabled:
                raise exception.InvalidInput("a reason is given only to disable the service")
        if self.service is None or self.service.row is None:
            raise exception.ComputeAgentError("the service is not registered yet")
        row_id = self.service.row.id
        if disabled:
            self.db.service_set_disabled(row_id, True, reason)
            LOG.warning("service disabled by the operator: %s", reason or "(no reason given)")
        elif not self.driver.connected:
            self.db.service_set_disabled(
                row_id, True, f"{AUTO_PREFIX} hypervisor connection lost (enable asked while away)"
            )
            LOG.warning("service enable asked while the hypervisor is away: enabled on its return")
        else:
            self.db.service_set_disabled(row_id, False, None)
            LOG.info("service enabled by the operator")
        row = self.db.service_get(self.host, BINARY)
        if row is None:
            raise exception.ServiceNotFound(f"service row of {self.host} is gone")
        return servicegroup.describe(row, self.conf.service_down_time)

    def statistics(self) -> ManagerStatistics:
        return ManagerStatistics(
            connected=self.driver.connected,
            driver=self.driver.statistics(),
            events=self.events.statistics() if self.events is not None else None,
            builds=self.operations.statistics(),
            resume=self.resume.statistics(),
            power_sync=self.power_sync.statistics(),
            reaper=self.reaper.statistics(),
            stats=self.stats.statistics(),
            retention=self.retention.statistics(),
        )

    def list_instances(self) -> list[dict[str, Any]]:
        return [instance_dict(i) for i in self.db.instance_get_all_by_host(self.host)]

    def get_instance_stats(self, instance_uuid: Any) -> dict[str, Any]:
        """The latest statistics sample of an instance of this host, and its age."""
        uuid = validate_uuid(instance_uuid, "instance_uuid")
        self.db.instance_get(uuid, host=self.host)  # InstanceNotFound if not ours
        try:
            return self.stats.get(uuid)
        except exception.InstanceNotFound:
            # Not sampled yet (created since the last cycle).
            return {
                "uuid": uuid,
                "stats": None,
                "taken_at": None,
                "age_s": None,
                "unresponsive": False,
            }

    # -- requests: sync ---------------------------------------------------

    def sync_power_states(
        self, instance_uuid: str | None = None, timeout: float | None = None
    ) -> dict[str, Any]:
        """Sync now, the whole host or one instance, and return the summary.

        A whole-host request joins the periodic task's queue, so concurrent
        requests share one run instead of each starting their own.
        """
        summary: SyncSummary
        if instance_uuid is not None:
            uuid = validate_uuid(instance_uuid, "instance_uuid")
            summary = self.power_sync.sync_one(uuid)
        else:
            assert self.service is not None
            summary = self.service.runner.run_now(POWER_SYNC).result(timeout)
        return summary.as_dict()

    def reap_deleted(self, timeout: float | None = None) -> dict[str, Any]:
        """Run the look for guests of deleted instances now; return its summary.

        It joins the periodic task's queue, as a forced power sync does.
        """
        assert self.service is not None
        summary: ReapSummary = self.service.runner.run_now(REAPER).result(timeout)
        return summary.as_dict()
