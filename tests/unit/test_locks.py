"""Per-instance locks: one holder per key, keys independent, nothing kept when idle."""

from compute_agent import green
from compute_agent.locks import STRIPES, KeyedLocks


def test_one_holder_per_key_and_keys_are_independent():
    locks = KeyedLocks()
    order = []

    def hold(key, label, seconds):
        with locks.lock(key):
            order.append(f"{label} in")
            green.sleep(seconds)
            order.append(f"{label} out")

    first = green.spawn(hold, "a", "a1", 0.05)
    green.sleep(0)
    second = green.spawn(hold, "a", "a2", 0)
    other = green.spawn(hold, "b", "b1", 0)
    for gt in (first, second, other):
        gt.wait()
    assert order.index("a1 out") < order.index("a2 in")  # same key waits
    assert order.index("b1 out") < order.index("a1 out")  # another key does not


def test_entries_are_dropped_once_no_one_holds_or_waits():
    locks = KeyedLocks()

    def waiter():
        with locks.lock("a"):
            pass

    with locks.lock("a"):
        gt = green.spawn(waiter)
        green.sleep(0)  # the waiter is now queued on "a"
        with locks.lock("b"):
            assert len(locks) == 2
        assert len(locks) == 1  # "b" dropped at once; "a" held and awaited
    gt.wait()
    assert len(locks) == 0


def test_a_guard_held_for_one_key_holds_up_no_key_of_another_stripe():
    """A thread that loses the GIL inside one key's update stops only its stripe.

    With one guard for every key, the power sync's workers queued behind such
    a thread and kept queueing (a convoy: a 10,000-instance sync took 0.18 s
    or 0.6 s by chance on threads).
    """
    locks = KeyedLocks()
    a = "instance-a"
    b = next(k for k in (f"instance-{i}" for i in range(1000)) if stripe(k) != stripe(a))
    done = green.native_event()

    def lock_b():
        with locks.lock(b):
            done.set()

    _, guard = locks._stripe(a)
    with guard:  # as if its holder were preempted here
        worker = green.native_thread(lock_b, name="lock-b")
        finished = done.wait(10)
    worker.join(10)
    assert finished, "locking b waited for a's guard"
    assert len(locks) == 0


def stripe(key):
    return hash(key) % STRIPES
