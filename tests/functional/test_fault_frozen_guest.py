"""Fault: one guest's QEMU frozen with SIGSTOP under a running agent.

A frozen QEMU never answers its monitor: the first ``getAllDomainStats``
that reaches it blocks for ever, NOWAIT or not, holding the domain's job in
libvirtd (docs/benchmarks.md, issue 4). The agent must keep serving: its
sync reads states that need no monitor, its statistics calls have a
deadline, and the frozen guest alone is reported unresponsive until it
thaws. Real agent process, real libvirtd, real QEMU guests (TCG, diskless,
64 MiB), SQLite in the test's directory: this fault is about the hypervisor,
and a private file keeps it clear of the server restarts other tests make.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import pathlib
import re
import signal
import time
import uuid as uuidlib
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import libvirt
import pytest

from compute_agent.admin.client import AdminClient
from compute_agent.db.api import Database
from tests.functional import qemu
from tests.functional.agent_process import REPO, AgentProcess, manage, manage_all
from tests.helpers import eventually

T = TypeVar("T")

GUESTS = 5
STATS_INTERVAL = 1
STATS_CALL_TIMEOUT = 3
# Above interval + call timeout: the cycle whose bulk call is stuck on the
# frozen QEMU brings no sample for anyone, and the other guests must not
# be judged unresponsive for sharing that cycle.
UNRESPONSIVE_AFTER = 6
FRESH = UNRESPONSIVE_AFTER
# Bounds the agent must keep with one guest frozen. Generous against a
# loaded 2-core machine; each is far below "hangs for ever".
SYNC_BOUND_S = 10.0
PING_BOUND_S = 2.0
UNRESPONSIVE_BOUND_S = UNRESPONSIVE_AFTER + STATS_CALL_TIMEOUT + 6.0
RECOVER_BOUND_S = 10.0
# The service's own stop waits up to 5 s for libvirt calls in flight.
STOP_BOUND_S = 15.0
# A call hung this long after its deadline, with the guest frozen, is taken as stuck.
STUCK_CONFIRM_S = 3.0


def poll(fn: Callable[[], T | None], timeout: float, what: str, every: float = 0.2) -> T:
    """Call ``fn`` until it returns something truthy, for at most ``timeout`` s."""
    return eventually(fn, timeout, what, every=every)


class Agent:
    """The agent under test and the ways to ask it things."""

    def __init__(self, root: pathlib.Path, prefix: str, libvirt_extra: str = "") -> None:
        self.prefix = prefix
        conf = root / "frozen.conf"
        conf.write_text(
            f"[DEFAULT]\nstate_path = {root}/state\nhost = frozen-host\nreport_interval = 1\n"
            "periodic_fuzzy_delay = 0\n"
            "[compute]\n"
            f"instance_name_template = {qemu.name_template(prefix)}\n"
            # Only the forced sync may change rows, so what it writes is what it read.
            "sync_power_state_interval = -1\nhandle_lifecycle_events = false\n"
            f"max_concurrent_builds = {GUESTS}\n"
            f"stats_interval = {STATS_INTERVAL}\nstats_call_timeout = {STATS_CALL_TIMEOUT}\n"
            f"stats_unresponsive_after = {UNRESPONSIVE_AFTER}\n"
            f"[libvirt]\nconnection_uri = {qemu.QEMU_URI}\nvirt_type = qemu\n{libvirt_extra}"
        )
        self.files = [REPO / "etc" / "compute-agent.conf", conf]
        self.db = Database(f"sqlite:///{root}/state/compute-agent.sqlite")
        synced = manage("db", "sync", config_files=self.files)
        assert synced.returncode == 0, synced.stderr
        self.admin = AdminClient(str(root / "state" / "admin.sock"), timeout=60)
        self.start()

    def start(self) -> None:
        self.proc = AgentProcess(self.files)
        self.proc.wait_for("admin socket listening")

    def call(self, method: str, **args: Any) -> Any:
        return self.admin.call(method, args)

    def timed(self, method: str, **args: Any) -> tuple[Any, float]:
        t0 = time.monotonic()
        result = self.call(method, **args)
        return result, time.monotonic() - t0


@pytest.fixture
def agent(tmp_path: pathlib.Path, request: pytest.FixtureRequest) -> Iterator[Agent]:
    extra = getattr(request, "param", "")
    with qemu.guests() as prefix:
        running = Agent(tmp_path, prefix, extra)
        try:
            yield running
            if running.proc.proc.poll() is None:
                rc, _ = running.proc.terminate(timeout=20)
                assert rc == 0, running.proc.output
            assert "Traceback" not in running.proc.output, running.proc.output
        finally:
            running.proc.kill()
            running.db.dispose()


def boot(agent: Agent, count: int) -> list[str]:
    """Build ``count`` guests at once over the admin socket; their UUIDs."""
    uuids = [str(uuidlib.uuid4()) for _ in range(count)]

    def one(uid: str) -> dict[str, Any]:
        payload = {"uuid": uid, "name": f"frozen-{uid[:8]}", "vcpus": 1, "memory_mb": 64}
        return agent.call("build_instance", instance=payload)

    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        built = list(pool.map(one, uuids))
    for inst in built:
        assert (inst["vm_state"], inst["task_state"], inst["power_state"]) == (
            "active",
            None,
            "running",
        ), inst
    return uuids


def fresh(agent: Agent, uid: str, max_age: float) -> dict[str, Any] | None:
    """The instance's stats reply if it holds a sample younger than ``max_age``."""
    stats = agent.call("get_instance_stats", instance_uuid=uid)
    if stats["stats"] is None or stats["age_s"] > max_age or stats["unresponsive"]:
        return None
    return stats


def test_a_frozen_guest_is_reported_and_nothing_else_stops(agent: Agent) -> None:
    prefix = agent.prefix
    conn = qemu.open_system()
    try:
        uuids = boot(agent, GUESTS)
        names = {u: agent.db.instance_get(u).domain_name for u in uuids}
        for uid in uuids:
            poll(lambda uid=uid: fresh(agent, uid, FRESH), 15, f"{uid} sampled")
        frozen, paused, others = uuids[0], uuids[1], uuids[1:]
        pid = qemu.qemu_pid(names[frozen])
        stats_runs = _stats_task(agent)["runs"]

        seen = len(agent.proc.lines)
        os.kill(pid, signal.SIGSTOP)
        frozen_at = time.monotonic()
        try:
            # Every thread of QEMU must take the stop; /proc says so a moment later.
            poll(lambda: qemu.process_state(pid) == "T", 5, "QEMU stopped", every=0.01)
            # A change the sync has to find, made on a guest that still answers.
            conn.lookupByName(names[paused]).suspend()

            summary, sync_s = agent.timed("sync_power_states")
            assert sync_s < SYNC_BOUND_S, summary
            assert summary["aborted"] is None and summary["errors"] == 0, summary
            assert summary["checked"] == GUESTS, summary
            # 1, unless a reconnection's sync (another test restarting libvirtd) came first.
            assert summary["changed"] <= 1, summary
            assert summary["unknown_domains"] == [] or all(
                not d.startswith(prefix) for d in summary["unknown_domains"]
            )
            rows = {i["uuid"]: i for i in agent.call("list_instances")}
            for uid in uuids:
                state = conn.lookupByName(names[uid]).state()[0]
                want = "paused" if state == libvirt.VIR_DOMAIN_PAUSED else "running"
                assert rows[uid]["power_state"] == want, (uid, rows[uid])
            assert rows[paused]["power_state"] == "paused"
            assert rows[frozen]["power_state"] == "running"  # stopped, not off

            status = poll(
                lambda: (s := agent.call("status"))["unresponsive_instances"] == [frozen] and s,
                UNRESPONSIVE_BOUND_S,
                "the frozen guest reported unresponsive",
            )
            unresponsive_s = time.monotonic() - frozen_at
            # Every other guest keeps getting fresh, complete samples.
            for uid in others:
                poll(
                    lambda uid=uid: fresh(agent, uid, FRESH),
                    5,
                    f"{uid} fresh while another is frozen",
                )
            stats = _stats_task(agent)
            assert stats["runs"] >= stats_runs + 2, stats  # cycles go on completing
            assert status["host_state"]["service"]["up"] is True

            # What an operator sees: the CLI, side by side with a ping.
            shown, status_cli = manage_all(
                [["instances", "stats", frozen, "-f", "json"], ["status", "-f", "json"]],
                agent.files,
                timeout=30,
            )
            assert shown.returncode == 0 and status_cli.returncode == 0, (shown, status_cli)
            assert json.loads(shown.stdout)["unresponsive"] is True
            assert json.loads(status_cli.stdout)["unresponsive_instances"] == [frozen]
            ping_s = max(agent.timed("ping")[1] for _ in range(5))
            assert ping_s < PING_BOUND_S
            assert all(i["task_state"] is None for i in agent.call("list_instances"))
            assert qemu.process_state(pid) == "T"  # still frozen all along
        finally:
            os.kill(pid, signal.SIGCONT)
        thawed_at = time.monotonic()

        poll(lambda: fresh(agent, frozen, FRESH), RECOVER_BOUND_S, "recovery")
        recover_s = time.monotonic() - thawed_at
        assert agent.call("status")["unresponsive_instances"] == []
        # A call left behind returned once QEMU answered, and the agent said so. (On
        # a shared host another client's call may be the one QEMU's job went to:
        # then this agent's NOWAIT calls skipped the guest and none of its own hung.)
        key = _stuck_call(agent.proc.lines[seen:])
        if key is not None:
            agent.proc.wait_for(f"deadline returned ({key})", timeout=5)
        after = agent.call("sync_power_states")
        assert after["errors"] == 0 and after["checked"] == GUESTS, after
        assert all(i["task_state"] is None for i in agent.call("list_instances"))

        print(
            f"\nforced sync with a frozen guest: {sync_s:.2f} s; unresponsive after "
            f"{unresponsive_s:.1f} s; ping max {ping_s * 1000:.0f} ms; recovered "
            f"{recover_s:.1f} s after SIGCONT"
        )
    finally:
        conn.close()


# One connection, set aside 2 s into a stuck call: a sync needs a second one.
ONE_CONNECTION = "connection_pool_size = 1\nstuck_call_timeout = 2\n"


@pytest.mark.parametrize("agent", [ONE_CONNECTION], indirect=True)
def test_a_connection_stuck_on_a_frozen_guest_is_set_aside_and_replaced(agent: Agent) -> None:
    """The only connection is held by a statistics call stuck on a frozen QEMU; the
    sync that comes next gets a new connection once the stuck one is set aside,
    and the set-aside one is closed when its call finally returns."""
    uuids = boot(agent, 2)
    for uid in uuids:
        poll(lambda uid=uid: fresh(agent, uid, FRESH), 15, f"{uid} sampled")
    pid = qemu.qemu_pid(agent.db.instance_get(uuids[0]).domain_name)
    seen = len(agent.proc.lines)
    os.kill(pid, signal.SIGSTOP)
    try:
        poll(lambda: qemu.process_state(pid) == "T", 5, "QEMU stopped", every=0.01)
        if _confirmed_stuck(agent, seen) is None:
            pytest.skip("no call of this agent stayed hung on the frozen guest")
        summary, sync_s = agent.timed("sync_power_states")
        assert summary["aborted"] is None and summary["checked"] == 2, summary
        assert sync_s < SYNC_BOUND_S, summary
        connections = agent.call("status")["libvirt"]["connections"]
        assert connections["size"] == 1 and connections["stuck"] >= 1, connections
        assert connections["stuck_total"] >= 1, connections
        assert "its connection is set aside" in agent.proc.output
    finally:
        os.kill(pid, signal.SIGCONT)
    poll(
        lambda: agent.call("status")["libvirt"]["connections"]["stuck"] == 0,
        RECOVER_BOUND_S,
        "the stuck call returned and its connection was closed",
    )
    after = agent.call("sync_power_states")
    assert after["errors"] == 0 and after["checked"] == 2, after


def test_an_agent_stops_while_its_call_is_stuck_on_a_frozen_guest(agent: Agent) -> None:
    """SIGTERM must end the process even though a libvirt call will never return."""
    (uid,) = boot(agent, 1)
    poll(lambda: fresh(agent, uid, FRESH), 15, "sampled")
    stop_s = _stop_with_a_stuck_call(agent, qemu.qemu_pid(agent.db.instance_get(uid).domain_name))
    assert "compute-agent stopped" in agent.proc.output
    print(f"\nstopped with a statistics call stuck on a frozen guest in {stop_s:.1f} s")


def _stop_with_a_stuck_call(agent: Agent, pid: int, attempts: int = 3) -> float:
    """Freeze the guest until a call of the agent hangs on it, then SIGTERM the agent.

    Only the first client to reach a frozen QEMU hangs on it, and on a shared
    host a call may also be slow for other reasons (other tests' guests). An
    attempt counts when the agent's stop itself found a libvirt call still
    running; otherwise the guest is thawed, the agent restarted and the
    freeze tried again.
    """
    for _ in range(attempts):
        if agent.proc.proc.poll() is not None:
            agent.start()
        seen = len(agent.proc.lines)
        os.kill(pid, signal.SIGSTOP)
        try:
            poll(lambda: qemu.process_state(pid) == "T", 5, "QEMU stopped", every=0.01)
            key = _confirmed_stuck(agent, seen)
            if key is None:
                continue
            rc, stop_s = agent.proc.terminate(timeout=STOP_BOUND_S)
            assert rc == 0, agent.proc.output
            assert qemu.process_state(pid) == "T"
            if "still running at stop" in agent.proc.output:
                return stop_s  # it exited with the call still hung
        finally:
            os.kill(pid, signal.SIGCONT)
    pytest.skip(f"no call of this agent stayed hung on the frozen guest in {attempts} tries")


def _confirmed_stuck(agent: Agent, seen: int) -> str | None:
    """A statistics call logged past its deadline (after line ``seen``) that stays hung."""
    end = time.monotonic() + STATS_INTERVAL + STATS_CALL_TIMEOUT + 3
    key, since = None, 0.0
    while time.monotonic() < end:
        lines = agent.proc.lines[seen:]
        if key is None:
            key = _stuck_call(lines)
            since = time.monotonic()
        elif any(f"deadline returned ({key})" in line for line in lines):
            return None  # slow, not hung
        elif time.monotonic() - since >= STUCK_CONFIRM_S:
            return key
        time.sleep(0.1)
    return None


def _stuck_call(lines: list[str]) -> str | None:
    """The key of the first statistics call logged as past its deadline in ``lines``."""
    for line in lines:
        found = re.search(r"statistics call \((\S+)\) still running after", line)
        if found:
            return found.group(1)
    return None


def _stats_task(agent: Agent) -> dict[str, Any]:
    tasks = {t["name"]: t for t in agent.call("status")["periodic_tasks"]}
    return tasks["stats"]
