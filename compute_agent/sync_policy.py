"""What to do when the database and the hypervisor disagree.

power_state always follows the hypervisor. vm_state follows this table (a
test per row); anything not in it changes power_state only.

| DB vm_state              | hypervisor says                 | action                         |
|--------------------------|---------------------------------|--------------------------------|
| building, error, deleted | anything                        | power_state only               |
| active                   | shutdown or crashed             | steady: stopped                |
| active                   | suspended                       | stopped, and stop the domain   |
| active                   | paused                          | power_state only               |
| active                   | domain not found                | nostate, warning, vm_state kept |
| stopped                  | running, paused or suspended    | enforce: stop it; report: record |
| paused                   | shutdown or crashed             | steady: stopped                |
| paused or suspended      | running                         | re-read; still so: active      |

"steady" is the one rule of ``compute_agent.steady``: the state is read
again, and a shut-off (or paused) domain counts only once it has stayed so
for ``[libvirt] lifecycle_event_delay``; until then only power_state is
recorded and the instance is synced again after the delay. A reboot's
shut-off and QEMU's start-up pause are never recorded as vm_state.

An active instance whose domain is missing keeps its vm_state (with
power_state nostate and a warning at each sync): nothing is lost that an
operator cannot restore. ``reboot --hard`` re-creates its domain from the
instance's recorded spec and starts it; ``stop`` settles it as stopped,
and ``start`` then re-creates it.
"""

from __future__ import annotations

from dataclasses import dataclass

from compute_agent.states import PowerState, VmState

ENFORCE = "enforce"
REPORT = "report"


@dataclass(frozen=True)
class Decision:
    power_state: PowerState
    vm_state: VmState | None = None  # the new vm_state, None to keep it
    stop_domain: bool = False
    # Read the hypervisor once more, then decide again with ``rechecked``
    # set only if that read is steady (compute_agent.steady).
    recheck: bool = False
    warning: str | None = None


def decide(
    vm_state: str, observed: PowerState | None, action: str = ENFORCE, rechecked: bool = False
) -> Decision:
    """The decision for one instance; ``observed`` is None when its domain is missing.

    ``rechecked``: ``observed`` is a fresh read that counts as steady.
    """
    power = PowerState.NOSTATE if observed is None else observed
    vm = VmState(vm_state)
    if vm in (VmState.BUILDING, VmState.ERROR, VmState.DELETED):
        return Decision(power)
    if vm is VmState.ACTIVE:
        if observed is None:
            return Decision(power, warning="active instance has no domain on the hypervisor")
        if observed in (PowerState.SHUTDOWN, PowerState.CRASHED):
            if not rechecked:
                return Decision(power, recheck=True)
            return Decision(power, vm_state=VmState.STOPPED)
        if observed is PowerState.SUSPENDED:
            return Decision(power, vm_state=VmState.STOPPED, stop_domain=True)
        return Decision(power)
    if vm is VmState.STOPPED:
        if observed in (PowerState.RUNNING, PowerState.PAUSED, PowerState.SUSPENDED):
            if action == ENFORCE:
                return Decision(power, stop_domain=True)
            return Decision(power, warning=f"stopped instance is {observed} on the hypervisor")
        return Decision(power)
    if vm is VmState.PAUSED and observed in (PowerState.SHUTDOWN, PowerState.CRASHED):
        if not rechecked:
            return Decision(power, recheck=True)
        return Decision(power, vm_state=VmState.STOPPED)
    if vm in (VmState.PAUSED, VmState.SUSPENDED) and observed is PowerState.RUNNING:
        # Never a pause the agent made (it has no pause API): a passing
        # observation recorded as vm_state, healed once running is confirmed.
        if not rechecked:
            return Decision(power, recheck=True)
        return Decision(power, vm_state=VmState.ACTIVE)
    return Decision(power)
