"""The disagreement policy: one test per row of the table in sync_policy."""

import pytest

from compute_agent.states import PowerState as P
from compute_agent.states import VmState as V
from compute_agent.sync_policy import ENFORCE, REPORT, Decision, decide

ALL_OBSERVED = [*P, None]


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


@pytest.mark.parametrize("observed", [P.SHUTDOWN, P.CRASHED])
def test_row7_paused_shutdown_or_crashed_becomes_stopped_once_steady(observed):
    assert decide("paused", observed) == Decision(observed, recheck=True)
    assert decide("paused", observed, rechecked=True) == Decision(observed, vm_state=V.STOPPED)


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
