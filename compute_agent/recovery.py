"""Start-up recovery of operations an earlier agent process left half-done.

An agent killed mid-operation leaves its instances with a task_state that
nothing will ever clear, and the sync skips such instances: they would stay
stuck for good. At start-up every instance of this host whose task_state was
last written before this process started is settled from what the
hypervisor now says, and the change is recorded with source ``startup``.
A resume after a host boot cut short keeps its instance active: the pass,
still due, starts it.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass, field

from compute_agent import exception, green
from compute_agent.db.api import Database, InstanceRecord
from compute_agent.guest_ops import VM_STATE_OF, destroy_until_gone
from compute_agent.locks import KeyedLocks
from compute_agent.states import ActionSource, PowerState, TaskState, VmState
from compute_agent.virt.driver import ComputeDriver

LOG = logging.getLogger(__name__)

BUILD_TASKS = {TaskState.QUEUED.value, TaskState.SPAWNING.value}
# What an interrupted resume may leave: the domain off, or gone (a re-create cut short).
RESUME_OFF = frozenset({PowerState.SHUTDOWN, PowerState.CRASHED, PowerState.NOSTATE, None})


@dataclass
class RecoverySummary:
    recovered: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


def recover_interrupted(
    db: Database,
    driver: ComputeDriver,
    host: str,
    locks: KeyedLocks,
    started_at: dt.datetime,
) -> RecoverySummary:
    """Settle every instance left with a task_state by an earlier process.

    Raises HypervisorUnavailable if the hypervisor goes away meanwhile (the
    caller runs it again once it is back), DatabaseUnavailable if the
    database does (the caller retries it soon).
    """
    summary = RecoverySummary()
    for inst in db.instance_get_all_by_host(host):
        if inst.task_state is None or (inst.updated_at and inst.updated_at > started_at):
            continue
        with locks.lock(inst.uuid):
            try:
                _recover_one(db, driver, inst, summary)
            except exception.Unavailable:  # the caller retries: on reconnection, or soon (database)
                raise
            except Exception as exc:  # noqa: BLE001 - one instance must not stop the others
                summary.failed.append(inst.uuid)
                LOG.error("instance %s: start-up recovery failed: %s", inst.uuid, exc)
        green.yield_now()
    if summary.recovered or summary.deleted or summary.failed:
        LOG.warning(
            "start-up recovery: %d interrupted operation(s) settled, %d delete(s) completed, "
            "%d failed",
            len(summary.recovered),
            len(summary.deleted),
            len(summary.failed),
        )
    return summary


def _observe(driver: ComputeDriver, inst: InstanceRecord) -> PowerState | None:
    """A foreign domain counts as missing: recovery settles the row, never that domain."""
    try:
        return driver.power_state(inst)
    except exception.ForeignDomain:
        return None


def _recover_one(
    db: Database, driver: ComputeDriver, inst: InstanceRecord, summary: RecoverySummary
) -> None:
    task = inst.task_state
    reason = f"{task} interrupted by an agent restart"
    if task == TaskState.DELETING.value:
        destroy_until_gone(driver, inst)
        db.instance_soft_delete(inst, source=str(ActionSource.STARTUP), reason=reason)
        summary.deleted.append(inst.uuid)
        LOG.warning("instance %s: %s; delete completed", inst.uuid, reason)
        return
    observed = _observe(driver, inst)
    if task in BUILD_TASKS:
        if observed == PowerState.RUNNING:
            vm_state = VmState.ACTIVE
        else:
            # Half a build is no build: remove what there is, record the error.
            if observed is not None:
                driver.destroy(inst)
                observed = None
            vm_state = VmState.ERROR
    elif (
        task == TaskState.POWERING_ON.value
        and inst.vm_state == VmState.ACTIVE.value
        and (observed in RESUME_OFF)
    ):
        # Only a resume after a host boot powers on from active: the guest
        # ran before the boot and still should. Kept active, the pass (due
        # until it completes) starts it; recorded stopped or error, it was
        # lost for good.
        vm_state = VmState.ACTIVE
        reason += "; its guest is still to be resumed"
    elif observed is None and task == TaskState.POWERING_OFF.value:
        vm_state = VmState.STOPPED  # as a stop of a missing domain settles
        reason += "; its domain is missing"
    elif observed is None:
        vm_state = VmState.ERROR
        reason += "; its domain is missing"
    else:
        vm_state = VM_STATE_OF.get(observed, VmState.ERROR)
    values = {
        "task_state": None,
        "vm_state": vm_state.value,
        "power_state": (observed or PowerState.NOSTATE).value,
    }
    db.instance_update(
        inst,
        values,
        action="recover",
        source=str(ActionSource.STARTUP),
        reason=reason,
        expected={"task_state": task},
    )
    summary.recovered.append(inst.uuid)
    LOG.warning("instance %s: %s; now %s/%s", inst.uuid, reason, vm_state, values["power_state"])
