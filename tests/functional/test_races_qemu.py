"""The short randomized race run of issue 12, on real QEMU guests (about 60 s).

A seeded schedule of agent operations, out-of-band libvirt actions and
forced syncs from four threads on six tiny guests, then the invariants of
``race_model.INVARIANTS`` (see the module and ``docs/reliability.md``).
Each run takes a new random seed, printed at the start and in the failure
message; ``COMPUTE_AGENT_RACE_SEED=<seed>`` replays one. A failure says
which invariant broke, with the rows, the libvirt states, the timeline and
the agent log's tail: it is a bug in the agent, not a flaky test, unless
the message shows otherwise. The long run is ``python -m bench race_soak``.
"""

from __future__ import annotations

import shutil

import pytest

from tests.functional import race_model

SCHEDULE_S = 35  # plus ~10 s of set-up and ~10 s of quiescing and checks
GUESTS = 6


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_random_races_keep_state_correct(capsys):
    seed = race_model.seed_from_env()
    with capsys.disabled():
        print(f"\nrace run seed {seed} ({race_model.SEED_ENV}={seed} replays it)", flush=True)
    config = race_model.RaceConfig(seed=seed, seconds=SCHEDULE_S, guests=GUESTS)
    run = race_model.run_once(config, log=lambda _line: None)
    summary = run.summary()
    if run.violations:
        pytest.fail(
            f"race invariants violated (seed {seed}, {race_model.SEED_ENV}={seed} replays it): "
            f"{summary['violations']}\n{run.report()}",
            pytrace=False,
        )
    # The run must have exercised races, or passing says nothing.
    assert summary["steps"] >= 40, summary


U = "31ffd376-c895-426a-b6d0-99f788c5b799"
NOT_RUNNING = "Requested operation is not valid: domain is not running"


def _timeline(start_reply: str) -> list[race_model.Step]:
    """Seed 1798176452's last 9 s for one guest (threads backend, CI), times in s."""
    s = race_model.Step
    return [
        s(-1, "setup", "build", U, 1.260, 1.721, "ok", "active/running"),
        s(3, "op", "start", U, 22.306, 22.596, "ok", "active/running"),
        s(2, "oob", "destroy", U, 22.854, 24.666, "ok"),
        s(2, "oob", "create", U, 26.775, 28.539, "libvirtError", "qemu unexpectedly closed"),
        s(1, "oob", "destroy", U, 26.927, 28.539, "ok"),
        s(3, "op", "start", U, 27.596, 30.557, "ok", start_reply),
        s(1, "oob", "destroy", U, 29.702, 29.703, "libvirtError", NOT_RUNNING),
        s(3, "oob", "create", U, 30.652, 30.896, "ok"),
    ]


def test_the_model_takes_a_start_that_ended_off_as_the_users_last_word():
    """A destroy out of band overlapped a start, which replied "stopped/shutdown".

    The agent recorded the instance stopped, so it rightly stopped the guest
    created out of band next (30.902 s). The model took the start's request
    as still standing and called that stop a violation.
    """
    run = race_model.RaceRun(race_model.RaceConfig(seed=0))
    try:
        run.steps = _timeline("stopped/shutdown")
        assert run.desired_at(U, 30.902) == "stopped"
        run.steps = _timeline("active/running")
        assert run.desired_at(U, 30.902) == "active"
    finally:
        shutil.rmtree(run.dir, ignore_errors=True)
