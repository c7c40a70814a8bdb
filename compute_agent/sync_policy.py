"""What to do when the database and the hypervisor disagree.

power_state always follows the hypervisor. vm_state follows ``TABLE``: one
rule for every vm_state x observation (each PowerState, and the domain
gone) x ``[compute] power_sync_action``; a missing rule is an error, and a
unit test walks the whole input space. ``render_table`` prints it as the
docs/architecture.md's table (a test keeps the two equal):
``python -m compute_agent.sync_policy``.

Principles:

* ``report`` only records: it never stops a domain; it writes power_state
  (and vm_state where the guest's own state is recorded) and warns.
* "steady" is the one rule of ``compute_agent.steady``: the state is read
  again, and a shut-off (or paused) domain counts only once it has stayed so
  for ``[libvirt] lifecycle_event_delay``; until then only power_state is
  recorded and the instance is synced again after the delay. A reboot's
  shut-off and QEMU's start-up pause are never recorded as vm_state.
* ``paused`` and ``suspended`` are never asked for (there is no pause or
  suspend API): they record what a guest was seen doing, so they follow
  the hypervisor's steady state, whatever it becomes.
* An active instance whose domain is missing keeps its vm_state (with
  power_state nostate and a warning at each sync): nothing is lost that an
  operator cannot restore. ``reboot --hard`` re-creates its domain from the
  instance's recorded spec and starts it; ``stop`` settles it as stopped,
  and ``start`` then re-creates it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from compute_agent.exception import PolicyGap
from compute_agent.states import PowerState, VmState

ENFORCE = "enforce"
REPORT = "report"
ACTIONS = (ENFORCE, REPORT)
# Every observation the sync can make: a PowerState, or None (domain gone).
OBSERVATIONS: tuple[PowerState | None, ...] = (*PowerState, None)
GONE_LABEL = "domain gone"


@dataclass(frozen=True)
class Decision:
    power_state: PowerState
    vm_state: VmState | None = None  # the new vm_state, None to keep it
    stop_domain: bool = False
    # Read the hypervisor once more, then decide again with ``rechecked``
    # set only if that read is steady (compute_agent.steady).
    recheck: bool = False
    warning: str | None = None


@dataclass(frozen=True)
class Rule:
    """What one input leads to. Exactly one kind: steady ``to``, ``stop``, ``warn``
    or nothing, and nothing always says ``why``."""

    to: VmState | None = None  # vm_state to record once a re-read is steady
    stop: bool = False  # stop the domain (enforce only)
    stop_to: VmState | None = None  # vm_state recorded with the stop
    warn: str | None = None  # logged at each sync; may use {observed}
    why: str | None = None  # why doing nothing is right

    def describe(self, observed: PowerState | None = None) -> str:
        """The rule in docs/architecture.md's words, for ``observed``."""
        if self.to is not None:
            return f"re-read; steady: {self.to}"
        if self.stop:
            return "stop the domain" + (f"; {self.stop_to}" if self.stop_to else "")
        if self.warn is not None:
            warning = self.warn.format(observed=_label(observed))
            return f"record; warn at each sync: {warning}"
        return f"nothing: {self.why}"


def _nothing(why: str) -> Rule:
    return Rule(why=why)


def _steady(to: VmState) -> Rule:
    return Rule(to=to)


def _both(rule: Rule) -> tuple[Rule, Rule]:
    return rule, rule


_S = PowerState
_CONSISTENT = "consistent"
_TRANSIENT = "no state from libvirt; read again next sync"
_STEADY_STOPPED = _both(_steady(VmState.STOPPED))
_HEAL_ACTIVE = _both(_steady(VmState.ACTIVE))
_STOP_OR_WARN = (Rule(stop=True), Rule(warn="stopped instance is {observed} on the hypervisor"))

# (vm_state, observation) -> (enforce rule, report rule). Only the states
# that some other actor owns get a rule for "anything"; every other pair is
# written out, so a new observation is a gap, not a silent "consistent".
_ROWS: dict[tuple[VmState, PowerState | None], tuple[Rule, Rule]] = {}
for _obs in OBSERVATIONS:
    _ROWS[VmState.BUILDING, _obs] = _both(_nothing("the build (or start-up recovery) settles it"))
    _ROWS[VmState.ERROR, _obs] = _both(_nothing("an operator settles it (stop, reboot --hard)"))
    _ROWS[VmState.DELETED, _obs] = _both(
        _nothing(
            "the sync skips deleted rows; a domain still there is the running-deleted "
            "task's (`running_deleted_instance_action`)"
        )
    )
_ROWS.update(
    {
        (VmState.ACTIVE, _S.RUNNING): _both(_nothing(_CONSISTENT)),
        (VmState.ACTIVE, _S.PAUSED): _both(
            _nothing("QEMU starting, or paused from outside: memory kept, power_state records it")
        ),
        (VmState.ACTIVE, _S.SHUTDOWN): _STEADY_STOPPED,
        (VmState.ACTIVE, _S.CRASHED): _STEADY_STOPPED,
        (VmState.ACTIVE, _S.SUSPENDED): (
            Rule(stop=True, stop_to=VmState.STOPPED),
            Rule(warn="active instance is suspended on the hypervisor"),
        ),
        (VmState.ACTIVE, _S.NOSTATE): _both(_nothing(_TRANSIENT)),
        (VmState.ACTIVE, None): _both(Rule(warn="active instance has no domain on the hypervisor")),
        (VmState.STOPPED, _S.RUNNING): _STOP_OR_WARN,
        (VmState.STOPPED, _S.PAUSED): _STOP_OR_WARN,
        (VmState.STOPPED, _S.SUSPENDED): _STOP_OR_WARN,
        (VmState.STOPPED, _S.SHUTDOWN): _both(_nothing(_CONSISTENT)),
        (VmState.STOPPED, _S.CRASHED): _both(_nothing(_CONSISTENT)),
        (VmState.STOPPED, _S.NOSTATE): _both(_nothing(_TRANSIENT)),
        (VmState.STOPPED, None): _both(_nothing("consistent: `start` re-creates the domain")),
    }
)
# paused and suspended record what the guest was seen doing: they follow it.
for _vm in (VmState.PAUSED, VmState.SUSPENDED):
    _ROWS[_vm, _S.RUNNING] = _HEAL_ACTIVE
    for _obs in (_S.SHUTDOWN, _S.CRASHED, None):
        _ROWS[_vm, _obs] = _STEADY_STOPPED
    _ROWS[_vm, _S.NOSTATE] = _both(_nothing(_TRANSIENT))
_ROWS[VmState.PAUSED, _S.PAUSED] = _both(_nothing(_CONSISTENT))
_ROWS[VmState.PAUSED, _S.SUSPENDED] = _both(_steady(VmState.SUSPENDED))
_ROWS[VmState.SUSPENDED, _S.SUSPENDED] = _both(_nothing(_CONSISTENT))
_ROWS[VmState.SUSPENDED, _S.PAUSED] = _both(_steady(VmState.PAUSED))

# (vm_state, observation, action) -> Rule: the whole policy.
TABLE: dict[tuple[VmState, PowerState | None, str], Rule] = {
    (vm, obs, action): rules[i]
    for (vm, obs), rules in _ROWS.items()
    for i, action in enumerate(ACTIONS)
}


def rule_for(vm_state: VmState, observed: PowerState | None, action: str) -> Rule:
    """The table's rule for one input; PolicyGap if it has none."""
    try:
        return TABLE[vm_state, observed, action]
    except KeyError:
        raise PolicyGap(f"no sync rule for {vm_state} / {observed} / {action}") from None


def decide(
    vm_state: str, observed: PowerState | None, action: str = ENFORCE, rechecked: bool = False
) -> Decision:
    """The decision for one instance; ``observed`` is None when its domain is missing.

    ``rechecked``: ``observed`` is a fresh read that counts as steady.
    """
    power = PowerState.NOSTATE if observed is None else observed
    rule = rule_for(VmState(vm_state), observed, action)
    if rule.to is not None:
        if not rechecked:
            return Decision(power, recheck=True)
        return Decision(power, vm_state=rule.to)
    if rule.stop and action == ENFORCE:
        return Decision(power, vm_state=rule.stop_to, stop_domain=True)
    if rule.warn is not None:
        return Decision(power, warning=rule.warn.format(observed=power))
    return Decision(power)


def _label(observed: PowerState | None) -> str:
    return GONE_LABEL if observed is None else str(observed)


def render_table() -> str:
    """The policy as a markdown table: one row per vm_state and group of
    observations that share their rules."""
    lines = [
        "| DB vm_state | hypervisor says | enforce | report |",
        "|---|---|---|---|",
    ]
    for vm in VmState:
        groups: dict[tuple[str, ...], list[str]] = {}
        for obs in OBSERVATIONS:
            described = tuple(TABLE[vm, obs, a].describe(obs) for a in ACTIONS)
            groups.setdefault(described, []).append(_label(obs))
        for described, observed in groups.items():
            lines.append(f"| {vm} | {', '.join(observed)} | {' | '.join(described)} |")
    return "\n".join(lines) + "\n"


# Checked at import: a gap is a bug, never a silent "nothing".
_missing = set(itertools.product(VmState, OBSERVATIONS, ACTIONS)) - TABLE.keys()
if _missing:  # pragma: no cover - the unit tests walk the same space
    raise PolicyGap(f"sync policy has no rule for {sorted(map(str, _missing))}")

if __name__ == "__main__":
    print(render_table(), end="")
