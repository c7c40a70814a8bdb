"""Guest steps shared by the operations and the background jobs that repair or reap.

It sits below ``operations``, ``recovery``, ``reaper`` and ``resume``, so
those never import each other for a helper; it imports only the driver
contract and the state vocabulary.
"""

from __future__ import annotations

import logging

from compute_agent import exception
from compute_agent.states import PowerState, VmState
from compute_agent.virt.driver import ComputeDriver
from compute_agent.virt.spec import InstanceRef

LOG = logging.getLogger("compute_agent.operations")

# A delete removes the domain, checks it is gone, and tries again this often
# if a concurrent start or define brought it back meanwhile.
DESTROY_ATTEMPTS = 3

# What an instance is, judged from its domain once an operation is over.
VM_STATE_OF = {
    PowerState.RUNNING: VmState.ACTIVE,
    PowerState.PAUSED: VmState.PAUSED,
    PowerState.SUSPENDED: VmState.SUSPENDED,
    PowerState.SHUTDOWN: VmState.STOPPED,
    PowerState.CRASHED: VmState.STOPPED,
}


def destroy_until_gone(driver: ComputeDriver, inst: InstanceRef) -> None:
    """Destroy the domain, then make sure no domain of this name and UUID is left.

    A start or define racing the delete (out of band) can bring the domain
    back between the driver's steps; the row must never be deleted while
    its guest still runs, owned by nobody. ForeignDomain is the caller's.
    """
    for attempt in range(1, DESTROY_ATTEMPTS + 1):
        try:
            driver.destroy(inst)
        except exception.InstanceNotFound:
            if attempt == 1:
                LOG.info("instance %s: no domain to destroy", inst.uuid)
        if not driver.instance_exists(inst):
            return
        LOG.warning(
            "instance %s: its domain came back during the delete (attempt %d); destroying it",
            inst.uuid,
            attempt,
        )
    raise exception.InstanceInvalidState(
        f"instance {inst.uuid}: its domain keeps coming back; delete not completed"
    )
