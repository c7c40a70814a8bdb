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
