"""The periodic-task runner: scheduling, isolation, failures, run-now, stop."""

import logging

import pytest

from compute_agent import exception, green
from compute_agent.periodic import PeriodicRunner, PeriodicTask, TaskStopped


def test_each_task_runs_in_its_own_greenthread():
    seen = {}
    runner = PeriodicRunner()
    for name in ("a", "b"):
        runner.add(name, lambda n=name: seen.setdefault(n, green.current_name()), 10)
    runner.start()
    green.sleep(0.05)
    runner.stop(1)
    assert seen == {"a": "a", "b": "b"}


def test_interval_is_start_to_start():
    starts = []

    def work():
        starts.append(green.monotonic())
        green.sleep(0.06)

    task = PeriodicTask("t", work, 0.1)
    task.start()
    green.sleep(0.45)
    task.stop(1)
    gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    assert len(gaps) >= 3
    assert all(0.09 <= g <= 0.14 for g in gaps), gaps


def test_long_run_is_followed_at_once_never_overlapped():
    active, overlaps, starts = [0], [0], []

    def slow():
        starts.append(green.monotonic())
        active[0] += 1
        overlaps[0] = max(overlaps[0], active[0])
        green.sleep(0.15)
        active[0] -= 1

    task = PeriodicTask("slow", slow, 0.05)
    task.start()
    green.sleep(0.5)
    task.stop(1)
    assert overlaps[0] == 1
    gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    assert gaps and all(0.14 <= g <= 0.2 for g in gaps), gaps
    assert task.max_lateness >= 0.09


def test_slow_task_does_not_delay_another():
    ticks = []
    runner = PeriodicRunner()
    runner.add("slow", lambda: green.execute(green.native_sleep, 0.5), 10)
    runner.add("fast", lambda: ticks.append(green.monotonic()), 0.05)
    runner.start()
    green.sleep(0.4)
    runner.stop(2)
    assert len(ticks) >= 6
    assert runner.tasks["fast"].max_lateness < 0.03


def test_initial_fuzzy_delay_is_bounded_and_random():
    import random

    runner = PeriodicRunner(fuzzy_delay=5, rng=random.Random(7))
    delays = [runner.add(f"t{i}", lambda: None, 1).initial_delay for i in range(20)]
    assert all(0 <= d <= 5 for d in delays) and len(set(delays)) == 20
    assert runner.add("nofuzz", lambda: None, 1, fuzzy=False).initial_delay == 0


def test_first_run_waits_for_initial_delay():
    ran = []
    task = PeriodicTask("t", lambda: ran.append(green.monotonic()), 10, initial_delay=0.2)
    t0 = green.monotonic()
    task.start()
    green.sleep(0.1)
    assert ran == []
    green.sleep(0.2)
    task.stop(1)
    assert len(ran) == 1 and ran[0] - t0 >= 0.19


def test_failure_is_logged_counted_and_stays_on_schedule(caplog):
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) <= 3:
            raise RuntimeError(f"boom {len(calls)}")
        return "ok"

    task = PeriodicTask("flaky", flaky, 0.05)
    with caplog.at_level(logging.INFO):
        task.start()
        green.sleep(0.28)
        task.stop(1)
    assert task.failures == 3 and task.runs >= 5
    assert task.last_error is None and task.last_result == "ok"
    text = caplog.text
    assert text.count("Traceback") == 1  # the first failure in a streak only
    assert "failed again (3 in a row): RuntimeError: boom 3" in text
    assert "recovered after 3 failures" in text


def test_figures_report_the_last_error():
    task = PeriodicTask("bad", lambda: 1 / 0, 10)
    task.start()
    green.sleep(0.02)
    fig = task.statistics()
    task.stop(1)
    assert fig.runs == 1 and fig.failures == 1
    assert fig.last_error.startswith("ZeroDivisionError")
    assert fig.last_start is not None and fig.last_duration_s is not None
    assert 9 < fig.next_run_in_s <= 10


def test_run_now_returns_result_and_reschedules():
    count = [0]

    def work():
        count[0] += 1
        return count[0]

    task = PeriodicTask("t", work, 100, initial_delay=100)
    task.start()
    assert task.run_now().result(1) == 1
    assert task.run_now().result(1) == 2
    task.stop(1)


def test_run_now_on_disabled_task():
    task = PeriodicTask("off", lambda: "done", -1)
    task.start()
    assert not task.enabled
    green.sleep(0.05)
    assert task.runs == 0
    assert task.run_now().result(1) == "done"
    assert task.statistics().next_run_in_s is None
    task.stop(1)


def test_requests_during_a_run_coalesce_into_one_extra_run():
    started = []
    gate = green.Event()

    def work():
        started.append(len(started) + 1)
        gate.wait(2)
        return len(started)

    task = PeriodicTask("t", work, -1)
    task.start()
    first = task.run_now()
    green.sleep(0.02)
    assert started == [1]
    during = [task.run_now() for _ in range(5)]
    gate.set()
    assert first.result(1) == 1
    assert {f.result(1) for f in during} == {2}  # all covered by the same second run
    green.sleep(0.05)
    assert started == [1, 2]
    task.stop(1)


def test_run_now_failure_reaches_every_caller():
    task = PeriodicTask("t", lambda: 1 / 0, -1)
    task.start()
    futs = [task.run_now(), task.run_now()]
    for fut in futs:
        with pytest.raises(ZeroDivisionError):
            fut.result(1)
    task.stop(1)


def test_stop_lets_a_running_task_finish_within_grace():
    done = []

    def work():
        green.sleep(0.1)
        done.append(True)

    task = PeriodicTask("t", work, 10)
    task.start()
    green.sleep(0.02)
    task.stop(1)
    assert done == [True]


def test_stop_cancels_a_task_past_grace_and_fails_its_callers():
    task = PeriodicTask("stuck", lambda: green.sleep(30), -1)
    task.start()
    fut = task.run_now()
    green.sleep(0.02)
    t0 = green.monotonic()
    task.stop(0.2)
    assert green.monotonic() - t0 < 0.5
    with pytest.raises(TaskStopped):
        fut.result(1)
    with pytest.raises(TaskStopped):
        task.run_now().result(1)


def test_runner_stops_kept_tasks_later():
    order = []
    runner = PeriodicRunner()
    runner.add("heartbeat", lambda: None, 10)
    runner.add("other", lambda: None, 10)
    for t in runner.tasks.values():
        original = t.stop
        t.stop = lambda grace, t=t, original=original: (order.append(t.name), original(grace))
    runner.start()
    runner.stop(1, keep=("heartbeat",))
    assert order == ["other"]
    runner.stop(1)
    assert order == ["other", "heartbeat"]
    runner.stop(1)  # stopping again stops nothing twice
    assert order == ["other", "heartbeat"]


def test_unknown_task_and_duplicate_names():
    runner = PeriodicRunner()
    runner.add("a", lambda: None, 1)
    with pytest.raises(ValueError):
        runner.add("a", lambda: None, 1)
    with pytest.raises(KeyError):
        runner.run_now("nope")


def test_a_typed_outage_is_one_line_without_a_traceback(caplog):
    def down():
        raise exception.DatabaseUnavailable("database unavailable: connection refused")

    task = PeriodicTask("beat", down, 0.05)
    with caplog.at_level(logging.INFO):
        task.start()
        green.sleep(0.12)
        task.stop(1)
    assert task.failures >= 2
    assert "Traceback" not in caplog.text
    assert (
        "periodic task beat failed: DatabaseUnavailable: database unavailable: connection refused"
        in caplog.text
    )
