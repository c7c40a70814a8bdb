"""A randomized, model-based race run on real QEMU guests (issue 12).

One real agent (a subprocess on qemu:///system, enforce mode, a short
periodic sync and event delay) owns a few tiny diskless guests. Several
threads then follow a seeded random schedule: agent operations through the
admin socket, out-of-band libvirt calls on a connection of our own (as an
operator with virsh would), and forced syncs. Every step is recorded with
its start and end time; that timeline is the model: for each guest, what
the user last asked for, through the agent or behind its back.

After the schedule the run quiesces (no more actions; it waits out an
event delay and a sync interval, then forces a sync) and checks the
invariants listed in :data:`INVARIANTS`. A failure report holds the seed,
the timeline, each violation with the rows and libvirt states, and the
agent log's tail; ``COMPUTE_AGENT_RACE_SEED`` replays a seed. A replay
makes the same choices in each thread; the interleaving still depends on
timing, so a seed reproduces a race often, not always.

Both ``tests/functional/test_races_qemu.py`` (the short run of ``make
test``) and ``bench/race_soak.py`` (the long one) drive this module.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import os
import pathlib
import random
import re
import shutil
import tempfile
import threading
import time
import uuid as uuidlib
from collections.abc import Callable, Iterator
from typing import Any

import libvirt
import sqlalchemy as sa

from compute_agent import exception, green
from compute_agent.admin.client import AdminClient, AgentUnreachable, ClientError, RemoteError
from compute_agent.db.models import Instance, InstanceAction
from compute_agent.virt.libvirt.driver import POWER_STATES
from tests.functional import qemu
from tests.functional.agent_process import AgentProcess, manage

SEED_ENV = "COMPUTE_AGENT_RACE_SEED"
MEMORY_MB = 64
TYPED_ERRORS = (
    exception.InstanceNotFound,
    exception.InstanceInvalidState,
    exception.InvalidInput,
    exception.Unavailable,  # hypervisor or database: both typed, "retry later"
)
# An error of these types means the agent refused the request as asked:
# nothing was done, so it is not something the user got.
REFUSALS = {"InstanceNotFound", "InstanceInvalidState", "InstanceExists", "InvalidInput"}
AMBIGUITY_S = 1.0  # timeline slack: events closer than this to a boundary are not judged

INVARIANTS = {
    "task_state": "no task_state left after quiescing",
    "power_state": "power_state equals libvirt's state for every live row",
    "vm_state": "vm_state consistent with power_state (sync_policy)",
    "orphan_domain": "no domain of the test without a live owner row",
    "missing_domain": "no live row without a domain (except vm_state error)",
    "enforced_stop": "no enforced stop of a guest the user last asked to run",
    "second_sync": "a second forced sync changes nothing",
    "traceback": "no Traceback in the agent's log",
    "reply": "every reply is a success or a typed error",
}

# vm_state -> the power_states it may settle with (compute_agent/sync_policy.py).
CONSISTENT = {
    "active": {"running", "paused"},  # paused: suspended behind the agent's back, recorded only
    "stopped": {"shutdown", "crashed", "nostate"},
    "paused": {"paused"},
    "suspended": {"suspended"},
    "error": None,  # anything
}

# (kind, action): weight. Agent operations, out-of-band calls, forced syncs.
ACTIONS: dict[tuple[str, str], int] = {
    ("op", "stop"): 10,
    ("op", "start"): 10,
    ("op", "reboot"): 4,
    ("op", "reboot_hard"): 6,
    ("op", "delete"): 3,
    ("oob", "destroy"): 10,
    ("oob", "suspend"): 4,
    ("oob", "resume"): 4,
    ("oob", "create"): 10,
    ("oob", "reboot"): 8,
    ("sync", "power-sync"): 4,
    ("sync", "power-sync-one"): 3,
}


def _plain_refusal(step: Step) -> bool:
    """An out-of-band call libvirt refused before touching the guest."""
    return "Requested operation is not valid" in step.detail


@dataclasses.dataclass
class RaceConfig:
    seed: int
    seconds: float = 35.0
    guests: int = 6
    threads: int = 4
    sync_interval: int = 5
    event_delay: float = 2.0
    backend: str = "sqlite"  # or a SQLAlchemy URL of a fresh database
    max_pause_s: float = 1.0  # each thread's pause between steps: uniform(0, this)


@dataclasses.dataclass
class Step:
    """One action of the schedule as it happened; times are ``time.time()``."""

    thread: int
    kind: str  # op, oob, sync, setup
    action: str
    uuid: str | None
    t0: float
    t1: float = 0.0
    outcome: str = "pending"  # ok, or the error's type
    detail: str = ""

    @property
    def refused(self) -> bool:
        return self.outcome in REFUSALS

    def line(self, origin: float) -> str:
        who = self.uuid[:8] if self.uuid else "-"
        return (
            f"{self.t0 - origin:8.3f} {self.t1 - origin:8.3f} t{self.thread} "
            f"{self.kind:5} {self.action:15} {who:8} {self.outcome} {self.detail[:120]}"
        )


@dataclasses.dataclass
class Violation:
    invariant: str
    uuid: str | None
    message: str


def seed_from_env(default: int | None = None) -> int:
    """The seed to replay (``COMPUTE_AGENT_RACE_SEED``), else ``default``, else a random one."""
    value = os.environ.get(SEED_ENV)
    if value:
        return int(value)
    return default if default is not None else random.SystemRandom().randrange(1, 2**31)


def dom_power(dom: libvirt.virDomain) -> str:
    return str(POWER_STATES.get(dom.state()[0], "nostate"))


def _log_time(line: str) -> float | None:
    """The epoch time of an agent log line (``%(asctime)s``: local time, milliseconds)."""
    try:
        return dt.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    except ValueError:
        return None


class RaceRun:
    """The agent, its guests, the schedule, the timeline and the checks, for one seed."""

    def __init__(self, config: RaceConfig) -> None:
        self.config = config
        self.prefix = qemu.new_prefix()
        self.host = f"race-{self.prefix[len(qemu.NAME_PREFIX) : -1]}"
        self.steps: list[Step] = []
        self.slots: list[str | None] = []
        self.lock = threading.Lock()
        self.origin = time.time()
        self.agent: AgentProcess | None = None
        self.admin: AdminClient | None = None
        self.engine: sa.Engine | None = None
        self.conn: libvirt.virConnect | None = None
        self.dir = pathlib.Path(tempfile.mkdtemp(prefix="race-"))
        self.db_url = ""
        self._drop_db: Callable[[], None] | None = None
        self.violations: list[Violation] = []
        self.sync_results: list[dict[str, Any]] = []
        self.enforced: list[tuple[float, str, str]] = []
        self.judged_stops = 0
        self.ambiguous_stops = 0

    # -- set-up and clean-up ----------------------------------------------

    @contextlib.contextmanager
    def running(self) -> Iterator[RaceRun]:
        """Start the agent and the guests; everything is removed when the block ends."""
        try:
            self._start()
            yield self
        finally:
            self._cleanup()

    def _database(self) -> str:
        backend = self.config.backend
        if backend == "sqlite":
            return f"sqlite:///{self.dir}/race.sqlite"
        if backend == "postgresql":
            admin_url = os.environ.get(
                "COMPUTE_AGENT_TEST_POSTGRESQL",
                "postgresql+pg8000://postgres@127.0.0.1:5432/postgres",
            )
            name = f"ca_race_{uuidlib.uuid4().hex[:10]}"
            admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
            with admin.connect() as c:
                c.execute(sa.text(f"CREATE DATABASE {name}"))

            def drop() -> None:
                with admin.connect() as c:
                    c.execute(sa.text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                admin.dispose()

            self._drop_db = drop
            return sa.make_url(admin_url).set(database=name).render_as_string(hide_password=False)
        return backend

    def _write_conf(self) -> pathlib.Path:
        c = self.config
        conf = self.dir / "agent.conf"
        conf.write_text(
            f"[DEFAULT]\nhost = {self.host}\nstate_path = {self.dir}/state\n"
            "report_interval = 2\nperiodic_fuzzy_delay = 0\n"
            "[compute]\n"
            f"instance_name_template = {qemu.name_template(self.prefix)}\n"
            f"sync_power_state_interval = {c.sync_interval}\n"
            "power_sync_action = enforce\n"
            "shutdown_timeout = 1\n"
            "stats_interval = 0\n"
            "[libvirt]\nconnection_uri = qemu:///system\nvirt_type = qemu\n"
            f"lifecycle_event_delay = {c.event_delay}\n"
            f"[database]\nconnection = {self.db_url}\n"
        )
        return conf

    def _start(self) -> None:
        self.conn = qemu.open_system()
        self.db_url = self._database()
        files = [self._write_conf()]
        synced = manage("db", "sync", config_files=files)
        if synced.returncode != 0:
            raise AssertionError(f"db sync failed: {synced.stderr}")
        self.engine = sa.create_engine(self.db_url)
        self.agent = AgentProcess(files)
        self.agent.wait_for("admin socket listening", 60)
        self.admin = AdminClient(str(self.dir / "state" / "admin.sock"), timeout=120)
        self._wait_admin()
        self.slots = [None] * self.config.guests
        builders = [
            green.spawn(self._build_slot, i, -1, "setup") for i in range(self.config.guests)
        ]
        for b in builders:
            b.wait()
        missing = [i for i, u in enumerate(self.slots) if u is None]
        if missing:
            raise AssertionError(f"initial builds failed:\n{self.timeline()}")

    def _wait_admin(self, timeout: float = 30) -> None:
        end = time.monotonic() + timeout
        while True:
            try:
                self.admin.call("ping")
                return
            except (AgentUnreachable, ClientError):  # not listening yet
                if time.monotonic() > end:
                    raise
                time.sleep(0.2)

    def _cleanup(self) -> None:
        if self.agent is not None:
            self.agent.kill()
            with contextlib.suppress(OSError):
                (self.dir / "agent.log").write_text(self.agent.output)
        with contextlib.suppress(libvirt.libvirtError, AttributeError):
            self.conn.close()
        qemu.remove_domains(self.prefix, timeout=60)
        if self.engine is not None:
            self.engine.dispose()
        if self._drop_db is not None:
            with contextlib.suppress(sa.exc.SQLAlchemyError):
                self._drop_db()
        if not os.environ.get("COMPUTE_AGENT_RACE_KEEP"):
            shutil.rmtree(self.dir, ignore_errors=True)

    # -- the schedule -----------------------------------------------------

    def schedule(self, thread: int) -> Iterator[tuple[float, str, str, int]]:
        """This thread's choices: (pause, kind, action, slot), from the seed alone."""
        rng = random.Random(f"{self.config.seed}-{thread}")
        keys = list(ACTIONS)
        weights = [ACTIONS[k] for k in keys]
        while True:
            kind, action = rng.choices(keys, weights)[0]
            yield (
                rng.uniform(0, self.config.max_pause_s),
                kind,
                action,
                rng.randrange(self.config.guests),
            )

    def run_schedule(self) -> None:
        """The threads, each on its own schedule, for ``seconds``; then they are joined."""
        end = time.monotonic() + self.config.seconds
        workers = [
            green.spawn(self._worker, t, end, name=f"race-{t}") for t in range(self.config.threads)
        ]
        for w in workers:
            w.wait()

    def _worker(self, thread: int, end: float) -> None:
        for pause, kind, action, slot in self.schedule(thread):
            time.sleep(pause)
            if time.monotonic() >= end:
                return
            uuid = self.slots[slot]
            if uuid is None:
                self._build_slot(slot, thread, "op")
            elif kind == "op":
                self._op(thread, action, uuid, slot)
            elif kind == "oob":
                self._oob(thread, action, uuid)
            else:
                self._sync(thread, None if action == "power-sync" else uuid)

    def _record(self, step: Step) -> Step:
        with self.lock:
            self.steps.append(step)
        return step

    def _call(self, step: Step, method: str, args: dict[str, Any]) -> Any:
        try:
            result = self.admin.call(method, args)
            step.outcome = "ok"
            return result
        except RemoteError as exc:
            step.outcome = exc.type
            step.detail = exc.message
        except Exception as exc:  # noqa: BLE001 - recorded; the reply invariant judges it
            step.outcome = type(exc).__name__
            step.detail = str(exc)
        finally:
            step.t1 = time.time()
        return None

    def _build_slot(self, slot: int, thread: int, kind: str) -> None:
        with self.lock:
            if self.slots[slot] is not None:
                return
            uuid = str(uuidlib.uuid4())
            self.slots[slot] = uuid  # reserved: no other thread builds this slot meanwhile
        step = self._record(Step(thread, kind, "build", uuid, time.time()))
        spec = {"uuid": uuid, "name": f"race-{slot}", "vcpus": 1, "memory_mb": MEMORY_MB}
        result = self._call(step, "build_instance", {"instance": spec})
        if result is None:
            with self.lock:
                self.slots[slot] = None
        elif result:
            step.detail = f"{result.get('vm_state')}/{result.get('power_state')}"

    def _op(self, thread: int, action: str, uuid: str, slot: int) -> None:
        method, args = {
            "stop": ("stop_instance", {}),
            "start": ("start_instance", {}),
            "reboot": ("reboot_instance", {"hard": False}),
            "reboot_hard": ("reboot_instance", {"hard": True}),
            "delete": ("delete_instance", {}),
        }[action]
        step = self._record(Step(thread, "op", action, uuid, time.time()))
        result = self._call(step, method, {"instance_uuid": uuid, **args})
        if result:
            step.detail = f"{result.get('vm_state')}/{result.get('power_state')}"
        if action == "delete" and step.outcome in ("ok", "InstanceNotFound"):
            with self.lock:
                if self.slots[slot] == uuid:
                    self.slots[slot] = None

    def _oob(self, thread: int, action: str, uuid: str) -> None:
        """A libvirt call behind the agent's back, in a native thread (it blocks)."""
        step = self._record(Step(thread, "oob", action, uuid, time.time()))
        pause = random.Random(f"{self.config.seed}-{uuid}-{step.t0}").uniform(
            0, self.config.event_delay / 2
        )

        def act() -> str:
            dom = self.conn.lookupByUUIDString(uuid)
            if action == "reboot":  # as a reboot looks to the agent: off, then on again
                dom.destroy()
                time.sleep(pause)
                dom.create()
                return f"off {pause:.2f} s"
            getattr(dom, action)()
            return ""

        try:
            step.detail = green.execute(act)
            step.outcome = "ok"
        except libvirt.libvirtError as exc:
            step.outcome = "libvirtError"
            step.detail = exc.get_error_message() or str(exc)
        finally:
            step.t1 = time.time()

    def _sync(self, thread: int, uuid: str | None) -> dict[str, Any] | None:
        step = self._record(Step(thread, "sync", "power-sync", uuid, time.time()))
        result = self._call(step, "sync_power_states", {"instance_uuid": uuid} if uuid else {})
        if result:
            step.detail = ", ".join(
                f"{k}={result.get(k)}" for k in ("checked", "changed", "domains_stopped", "unknown")
            )
        return result

    # -- quiesce and check ------------------------------------------------

    def quiesce_and_check(self) -> list[Violation]:
        """Wait out the delays, force a sync, then check every invariant."""
        time.sleep(self.config.event_delay + self.config.sync_interval + 1)
        first = self._sync(-1, None)
        time.sleep(1)  # an event of that sync's own stops is still on its way
        rows, doms = self._snapshot()
        self._check_rows(rows, doms)
        second = self._sync(-1, None)
        rows2, doms2 = self._snapshot()
        self._check_second_sync(first, second, rows, rows2, doms, doms2)
        self._check_stops()
        self._check_log_and_replies()
        return self.violations

    def _snapshot(self) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
        """Rows of our host (deleted too) and our domains, read twice around the rows."""

        def domains() -> dict[str, dict[str, Any]]:
            found = {}
            for d in self.conn.listAllDomains():
                if d.name().startswith(self.prefix):
                    with contextlib.suppress(libvirt.libvirtError):
                        found[d.UUIDString()] = {
                            "name": d.name(),
                            "power": dom_power(d),
                            "persistent": bool(d.isPersistent()),
                        }
            return found

        before = green.execute(domains)
        table = Instance.__table__
        with self.engine.connect() as c:
            rows = {
                r.uuid: dict(r._mapping)
                for r in c.execute(sa.select(table).where(table.c.host == self.host))
            }
        after = green.execute(domains)
        for uuid, dom in after.items():
            if before.get(uuid, {}).get("power") != dom["power"]:
                dom["unstable"] = True
        return rows, after

    def _violate(self, invariant: str, uuid: str | None, message: str) -> None:
        self.violations.append(Violation(invariant, uuid, message))

    def _check_rows(self, rows: dict[str, dict], doms: dict[str, dict]) -> None:
        for uuid, row in rows.items():
            if row["deleted"]:
                continue
            dom = doms.get(uuid)
            state = f"row {_row(row)}, libvirt {dom}"
            if row["task_state"] is not None:
                self._violate("task_state", uuid, state)
            if dom is None:
                if row["vm_state"] != "error":
                    self._violate("missing_domain", uuid, state)
                continue
            if dom.get("unstable"):
                continue
            if row["power_state"] != dom["power"]:
                self._violate("power_state", uuid, state)
            allowed = CONSISTENT.get(row["vm_state"], set())
            if allowed is not None and row["power_state"] not in allowed:
                self._violate("vm_state", uuid, state)
        for uuid, dom in doms.items():
            row = rows.get(uuid)
            if row is None or row["deleted"]:
                worst = " (RUNNING: nobody owns it)" if dom["power"] == "running" else ""
                owner = _row(row) if row else "none"
                self._violate("orphan_domain", uuid, f"domain {dom}, row {owner}{worst}")

    def _check_second_sync(
        self,
        first: dict | None,
        second: dict | None,
        rows: dict,
        rows2: dict,
        doms: dict,
        doms2: dict,
    ) -> None:
        if first is None or second is None:
            self._violate("second_sync", None, f"a forced sync failed: {first} / {second}")
            return
        if second.get("changed") or second.get("domains_stopped"):
            self._violate("second_sync", None, f"second forced sync: {second}")
        for uuid in set(rows) | set(rows2):
            a, b = rows.get(uuid), rows2.get(uuid)
            if a is None or b is None or _row(a) != _row(b):
                self._violate("second_sync", uuid, f"row {_opt(a)} -> {_opt(b)}")
        for uuid in set(doms) | set(doms2):
            a, b = doms.get(uuid, {}).get("power"), doms2.get(uuid, {}).get("power")
            if a != b:
                self._violate("second_sync", uuid, f"libvirt {a} -> {b}")

    # -- enforced stops against the model ----------------------------------

    def enforced_stops(self) -> list[tuple[float, str, str]]:
        """Every stop the agent enforced: (time, uuid, evidence), from the log and the audit."""
        found: list[tuple[float, str, str]] = []
        pattern = re.compile(r"instance (\S+) is (\S+) in the database but (\S+) .*stopping it")
        for line in self.agent.lines:
            m = pattern.search(line)
            t = _log_time(line)
            if m and t is not None:
                found.append((t, m.group(1), line[24:]))
        table = InstanceAction.__table__
        with self.engine.connect() as c:
            audit = c.execute(
                sa.select(table).where(table.c.reason.like("%stopped by the sync%"))
            ).all()
        for a in audit:
            t = a.created_at.replace(tzinfo=dt.UTC).timestamp()
            # The audit row is written after the stop, which takes seconds.
            if not any(u == a.instance_uuid and -1 < t - ft < 10 for ft, u, _ in found):
                found.append((t, a.instance_uuid, f"audit: {a.reason}"))
        return sorted(found)

    def desired_at(self, uuid: str, when: float) -> str:
        """What the user last asked of a guest at ``when``: active, stopped or ambiguous.

        Agent operations that succeeded say it directly (start, reboot,
        build: active, unless the reply says the domain ended off; stop:
        stopped); one that failed (not refused: the
        agent tried and reported an error) leaves it ambiguous until the next
        action. Out of band, a destroy makes the guest
        stopped only once the shut-off has lasted ``lifecycle_event_delay``
        (shorter is a reboot, as the agent must see it); a create or resume
        on a guest the user wants stopped leaves it stopped (enforce mode
        rightly stops it again), on one the user wants running keeps it so.
        """
        delay = self.config.event_delay
        events = sorted(
            (s for s in self.steps if s.uuid == uuid and s.t0 < when and s.outcome != "pending"),
            key=lambda s: s.t0,
        )
        for s in events:  # an agent operation in flight then: its claim decides; not judged
            if s.kind in ("op", "setup") and s.t0 <= when <= s.t1:
                return "ambiguous"
        desired, off_since, ambiguous = "active", None, False

        def settle(now: float) -> None:
            nonlocal desired, off_since, ambiguous
            if desired == "active" and off_since is not None:
                off = now - off_since
                if off >= delay + AMBIGUITY_S:
                    desired, off_since = "stopped", None
                elif off >= delay - AMBIGUITY_S:
                    ambiguous = True

        for s in events:
            settle(s.t0)
            if s.kind in ("op", "setup") and s.outcome != "ok" and not s.refused:
                # Failed, and the user was told so (HypervisorUnavailable: say,
                # the guest's QEMU killed by an out-of-band destroy mid-start):
                # what the user wants next is not known until a later action.
                off_since, ambiguous = None, True
            elif s.kind in ("op", "setup") and not s.refused:
                if s.action in ("start", "reboot", "reboot_hard", "build"):
                    # A domain destroyed out of band during the operation ends
                    # it "stopped", and the user is told so: that is the state
                    # the agent then keeps (an out-of-band start is stopped again).
                    ended_off = s.detail.startswith("stopped/")
                    desired = "stopped" if ended_off else "active"
                    off_since, ambiguous = None, False
                elif s.action == "stop":
                    desired, off_since, ambiguous = "stopped", None, False
            elif s.kind == "oob" and s.outcome != "ok" and not _plain_refusal(s):
                # Failed part-way (say, QEMU killed under a reboot): the guest may
                # have gone off at any moment of the call, for any length of time.
                ambiguous = True
            elif s.kind == "oob" and s.outcome == "ok":
                if s.action == "destroy" and desired == "active":
                    # From the call's start: the guest may be off before it returns,
                    # so the shut-off is never judged shorter than it was.
                    off_since = s.t0
                elif s.action in ("create", "reboot") and desired == "active":
                    off_since = None
        settle(when)
        return "ambiguous" if ambiguous else desired

    def _check_stops(self) -> None:
        self.enforced = self.enforced_stops()
        for t, uuid, evidence in self.enforced:
            verdict = self.desired_at(uuid, t)
            if verdict == "ambiguous":
                self.ambiguous_stops += 1
                continue
            self.judged_stops += 1
            if verdict == "active":
                self._violate(
                    "enforced_stop",
                    uuid,
                    f"at {t - self.origin:.3f} s the user last asked for it running: {evidence}",
                )

    def _check_log_and_replies(self) -> None:
        tracebacks = [i for i, line in enumerate(self.agent.lines) if "Traceback" in line]
        for i in tracebacks[:3]:
            self._violate("traceback", None, "\n".join(self.agent.lines[max(0, i - 3) : i + 12]))
        if len(tracebacks) > 3:
            self._violate("traceback", None, f"... {len(tracebacks)} tracebacks in all")
        names = {c.__name__: c for c in vars(exception).values() if isinstance(c, type)}
        for s in self.steps:
            if s.kind == "oob" or s.outcome == "ok":
                continue
            cls = names.get(s.outcome)
            if cls is None or not issubclass(cls, TYPED_ERRORS):
                self._violate("reply", s.uuid, s.line(self.origin))

    # -- reporting --------------------------------------------------------

    def timeline(self) -> str:
        head = "  start      end thr kind  action          uuid     outcome detail"
        with self.lock:
            lines = [s.line(self.origin) for s in sorted(self.steps, key=lambda s: s.t0)]
        return "\n".join([head, *lines])

    def summary(self) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for s in self.steps:
            key = f"{s.kind}:{s.action}:{'ok' if s.outcome == 'ok' else 'err'}"
            counts[key] = counts.get(key, 0) + 1
        return {
            "seed": self.config.seed,
            "steps": len(self.steps),
            "enforced_stops": len(self.enforced),
            "judged_stops": self.judged_stops,
            "ambiguous_stops": self.ambiguous_stops,
            "violations": sorted({v.invariant for v in self.violations}),
            "counts": counts,
        }

    def report(self, tail: int = 80) -> str:
        """What a failure prints: seed, violations, the timeline, the log's tail."""
        parts = [
            f"race run seed {self.config.seed} (replay: {SEED_ENV}={self.config.seed}); "
            f"prefix {self.prefix}; {len(self.violations)} violation(s)",
        ]
        for v in self.violations:
            who = v.uuid or "-"
            parts.append(f"VIOLATED {v.invariant} ({INVARIANTS[v.invariant]}): {who}: {v.message}")
            if v.uuid:
                parts.extend(f"    {s.line(self.origin)}" for s in self.steps if s.uuid == v.uuid)
        parts.append(f"timeline (s since {self.origin:.3f}):\n{self.timeline()}")
        lines = self.agent.lines if self.agent else []
        parts.append(f"agent log, last {tail} lines:\n" + "\n".join(lines[-tail:]))
        return "\n".join(parts)


def _row(row: dict[str, Any] | None) -> str:
    if row is None:
        return "none"
    deleted = " deleted" if row["deleted"] else ""
    return f"{row['vm_state']}/{row['power_state']}/task={row['task_state']}{deleted}"


def _opt(row: dict[str, Any] | None) -> str:
    return _row(row) if row else "absent"


def run_once(config: RaceConfig, log: Callable[[str], None] = print) -> RaceRun:
    """One full run: set up, schedule, quiesce, check, clean up. The run, with its verdict."""
    log(f"race run: seed {config.seed} ({SEED_ENV}={config.seed} replays it)")
    run = RaceRun(config)
    with run.running():
        run.run_schedule()
        run.quiesce_and_check()
    return run
