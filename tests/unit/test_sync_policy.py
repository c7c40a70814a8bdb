"""The disagreement policy: the whole input space, then one test per row."""

import itertools
import re
from pathlib import Path

import pytest

from compute_agent import exception, sync_policy
from compute_agent.states import PowerState as P
from compute_agent.states import VmState as V
from compute_agent.sync_policy import ENFORCE, REPORT, Decision, decide

REPO = Path(__file__).resolve().parents[2]
ALL_OBSERVED = [*P, None]
SPACE = list(itertools.product(V, ALL_OBSERVED, [ENFORCE, REPORT]))

# Written here, not taken from the code: vm_state -> the observations it
# may settle with (None: the domain is gone).
SETTLED = {
    V.ACTIVE: {P.RUNNING},
    V.STOPPED: {P.SHUTDOWN, P.CRASHED, None},
    V.PAUSED: {P.PAUSED},
    V.SUSPENDED: {P.SUSPENDED},
}
# Pairs left as they are on purpose; each rule says why.
ACCEPTED = {(V.ACTIVE, P.PAUSED)} | {(vm, P.NOSTATE) for vm in V}
OWNED_ELSEWHERE = {V.BUILDING, V.ERROR, V.DELETED}


def settle(vm, observed, action):
    """Apply decisions with the hypervisor unchanged (a stop shuts it off)
    until nothing changes; return the final vm_state, observation, decision."""
    for _ in range(4):
        d = decide(vm, observed, action)
        if d.recheck:
            d = decide(vm, observed, action, rechecked=True)
        assert not d.recheck, "a steady re-read must settle the decision"
        if d.stop_domain:
            observed = P.SHUTDOWN
        if d.vm_state is None and not d.stop_domain:
            return vm, observed, d
        vm = d.vm_state or vm
    raise AssertionError(f"{vm}/{observed}/{action} never settles")


def test_the_table_has_a_rule_for_every_input_and_nothing_else():
    assert set(sync_policy.TABLE) == set(SPACE)


def test_a_missing_rule_is_an_error(monkeypatch):
    monkeypatch.delitem(sync_policy.TABLE, (V.SUSPENDED, None, REPORT))
    with pytest.raises(exception.PolicyGap):
        decide("suspended", None, REPORT)


@pytest.mark.parametrize("vm, observed, action", SPACE)
def test_every_input_is_decided_and_settles_consistent_or_reported(vm, observed, action):
    rule = sync_policy.rule_for(vm, observed, action)
    kinds = [rule.to is not None, rule.stop, rule.warn is not None, rule.why is not None]
    assert sum(kinds) == 1, f"{vm}/{observed}/{action}: one kind of rule, got {rule}"
    for rechecked in (False, True):
        d = decide(vm, observed, action, rechecked=rechecked)
        assert d.power_state is (P.NOSTATE if observed is None else observed)
        if action == REPORT:
            assert not d.stop_domain, "report never powers anything off"
    final_vm, final_obs, last = settle(vm, observed, action)
    if final_vm in OWNED_ELSEWHERE or (final_vm, final_obs) in ACCEPTED:
        return
    if last.warning:
        return  # recorded and warned of at every sync, never silently kept
    assert final_obs in SETTLED[final_vm], f"{vm}/{observed}/{action} stays {final_vm}/{final_obs}"


def test_the_readme_table_is_the_code():
    readme = (REPO / "docs" / "architecture.md").read_text()
    found = re.search(
        r"<!-- sync-policy-table:[^\n]*-->\n(.*?)<!-- end sync-policy-table -->", readme, re.S
    )
    assert found, "docs/architecture.md has no generated sync-policy table"
    assert found.group(1) == sync_policy.render_table(), (
        "docs/architecture.md's policy table is stale: "
        "paste `python -m compute_agent.sync_policy` in it"
    )


def test_the_rendered_table_names_every_vm_state_and_observation():
    table = sync_policy.render_table()
    for vm in V:
        for obs in ALL_OBSERVED:
            label = sync_policy.GONE_LABEL if obs is None else str(obs)
            assert re.search(rf"^\| {vm} \|[^|]*\b{label}\b", table, re.M), (vm, label)


@pytest.mark.parametrize("vm", ["building", "error", "deleted"])
@pytest.mark.parametrize("observed", ALL_OBSERVED)
def test_row1_building_error_deleted_change_power_state_only(vm, observed):
    expected = P.NOSTATE if observed is None else observed
    assert decide(vm, observed) == Decision(expected)


@pytest.mark.parametrize("observed", [P.SHUTDOWN, P.CRASHED])
def test_row2_active_shutdown_or_crashed_is_rechecked_then_stopped(observed):
    first = decide("active", observed)
    assert first == Decision(observed, recheck=True)
    assert decide("active", observed, rechecked=True) == Decision(observed, vm_state=V.STOPPED)
    # If the re-read sees it running again, nothing but power_state changes.
    assert decide("active", P.RUNNING, rechecked=True) == Decision(P.RUNNING)


def test_row3_active_suspended_is_stopped_and_the_domain_stopped():
    assert decide("active", P.SUSPENDED) == Decision(
        P.SUSPENDED, vm_state=V.STOPPED, stop_domain=True
    )


def test_row3_report_mode_never_stops_a_suspended_active_guest():
    for rechecked in (False, True):
        d = decide("active", P.SUSPENDED, REPORT, rechecked=rechecked)
        assert not d.stop_domain and d.vm_state is None and not d.recheck
        assert d.power_state is P.SUSPENDED and "suspended" in d.warning


def test_row4_active_paused_changes_power_state_only():
    assert decide("active", P.PAUSED) == Decision(P.PAUSED)


def test_row5_active_without_domain_warns_and_keeps_vm_state():
    d = decide("active", None)
    assert d.power_state is P.NOSTATE and d.vm_state is None and not d.stop_domain
    assert d.warning and "no domain" in d.warning


@pytest.mark.parametrize("observed", [P.RUNNING, P.PAUSED, P.SUSPENDED])
def test_row6_stopped_but_running_enforce_stops_report_records(observed):
    assert decide("stopped", observed, ENFORCE) == Decision(observed, stop_domain=True)
    reported = decide("stopped", observed, REPORT)
    assert not reported.stop_domain and reported.vm_state is None
    assert reported.power_state is observed and str(observed) in reported.warning


@pytest.mark.parametrize("action", [ENFORCE, REPORT])
@pytest.mark.parametrize("vm", ["paused", "suspended"])
@pytest.mark.parametrize("observed", [P.SHUTDOWN, P.CRASHED, None])
def test_row7_paused_or_suspended_off_or_gone_becomes_stopped_once_steady(vm, observed, action):
    power = P.NOSTATE if observed is None else observed
    assert decide(vm, observed, action) == Decision(power, recheck=True)
    assert decide(vm, observed, action, rechecked=True) == Decision(power, vm_state=V.STOPPED)


@pytest.mark.parametrize(
    "vm, observed, to", [("paused", P.SUSPENDED, V.SUSPENDED), ("suspended", P.PAUSED, V.PAUSED)]
)
def test_paused_and_suspended_follow_each_other_once_steady(vm, observed, to):
    assert decide(vm, observed) == Decision(observed, recheck=True)
    assert decide(vm, observed, rechecked=True) == Decision(observed, vm_state=to)


@pytest.mark.parametrize("vm", ["paused", "suspended"])
def test_row8_paused_or_suspended_but_running_heals_to_active_after_a_reread(vm):
    assert decide(vm, P.RUNNING) == Decision(P.RUNNING, recheck=True)
    assert decide(vm, P.RUNNING, rechecked=True) == Decision(P.RUNNING, vm_state=V.ACTIVE)


@pytest.mark.parametrize(
    "vm, observed",
    [
        ("active", P.RUNNING),
        ("stopped", P.SHUTDOWN),
        ("stopped", None),
        ("paused", P.PAUSED),
        ("suspended", P.SUSPENDED),
    ],
)
def test_everything_else_follows_power_state_only(vm, observed):
    d = decide(vm, observed)
    assert d.vm_state is None and not d.stop_domain and not d.recheck


def test_unknown_vm_state_is_an_error():
    with pytest.raises(ValueError):
        decide("exploded", P.RUNNING)
