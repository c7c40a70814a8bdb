"""Resume after a host boot: start again the guests that ran before it.

When the host reboots, every guest goes down with it while the cloud still
believes them ``active``. Without help the first power sync records them
stopped; with ``[compute] resume_guests_state_on_host_boot`` (off by
default, as in nova) they are started again first.

A host boot is told from an agent restart by the kernel's boot id, which
changes at every boot: the agent keeps the one it last saw in
``$state_path/boot_id``. No file (the first start on this host, or a lost
state directory) is *not* taken for a boot: starting guests nobody asked
for is worse than leaving them to the operator, so the id is just recorded.
The id is recorded once nothing more is due: at once when the option is off
or this is no boot, after a complete pass otherwise, so an agent stopped or
a hypervisor lost mid-pass resumes the rest at its next chance; a database
lost mid-pass has the manager run the pass again soon, the sync held back.

The pass starts each ``active`` instance whose domain is off (shut off,
crashed, or gone: ``InstanceOperations.resume`` re-creates a missing domain
from the recorded spec) through the operations' own flow: the per-instance
lock, task_state ``powering-on``, and ``instance_actions`` rows. At most
``max_concurrent_builds`` run at once (0: no limit). The power sync waits
for the pass (``wait_done``), since it would otherwise record the guests
stopped; that wait, like the pass, gives way as soon as the agent stops.
The wait alone cannot keep them safe (a sync already past it, a re-check, an
event), so while ``due`` no sync records an instance stopped
(the ``resume_due`` the sync is built with): the sync after the pass does.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from compute_agent import exception, green
from compute_agent.counters import Counters
from compute_agent.db.api import Change, Database, action_rows
from compute_agent.operations import InstanceOperations
from compute_agent.states import ActionSource, PowerState, VmState
from compute_agent.utils import utcnow
from compute_agent.virt.driver import ComputeDriver

LOG = logging.getLogger(__name__)

BOOT_ID_FILE = "boot_id"
WHY = "the guest was running before the host boot"
# Domain states a resume starts; None is a domain that is gone.
OFF_STATES = frozenset({PowerState.SHUTDOWN, PowerState.CRASHED, PowerState.NOSTATE, None})
# How often a waiter (the sync, a pass waiting for a slot) looks at "stopping".
POLL_S = 0.2
# The longest the power sync waits for a pass; past it, it syncs anyway.
SYNC_WAIT_LIMIT_S = 1800.0


def read_boot_id(path: str) -> str | None:
    """The kernel's boot id, or None when it cannot be read (not Linux, a test)."""
    try:
        with open(path, encoding="ascii") as f:
            value = f.read().strip()
    except (OSError, UnicodeDecodeError) as exc:
        LOG.warning("cannot read the host's boot id from %s: %s", path, exc)
        return None
    return value or None


def load_recorded(path: str) -> str | None:
    try:
        with open(path, encoding="ascii") as f:
            return f.read().strip() or None
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        LOG.warning("cannot read the recorded boot id %s: %s", path, exc)
        return None


def save_recorded(path: str, boot_id: str) -> None:
    """Write atomically (temp file, fsync, rename): a crash leaves old or new, never half."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".boot_id.", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(boot_id + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@dataclass(frozen=True)
class ResumeStatistics:
    """What ``status`` shows of the resume after a host boot."""

    enabled: bool = False
    was_boot: bool | None = None
    state: str = "off"  # off, no-boot, pending, running, done, failed, interrupted
    candidates: int = 0
    resumed: int = 0
    failed: int = 0
    skipped: int = 0
    max_in_flight: int = 0
    duration_s: float | None = None
    last_error: str | None = None


class BootResume:
    def __init__(
        self,
        db: Database,
        driver: ComputeDriver,
        operations: InstanceOperations,
        host: str,
        *,
        enabled: bool,
        state_path: str,
        boot_id_path: str,
        concurrency: int,
        should_stop: Callable[[], bool] = lambda: False,
    ) -> None:
        self.db = db
        self.driver = driver
        self.operations = operations
        self.host = host
        self.enabled = enabled
        self.record_path = os.path.join(state_path, BOOT_ID_FILE)
        self.boot_id_path = boot_id_path
        self.concurrency = max(0, concurrency)
        self.should_stop = should_stop
        self.counters = Counters(ResumeStatistics, enabled=enabled)
        self.due = False
        self._boot_id: str | None = None
        self._stopping = False
        self._in_flight = 0
        # The pass's guests run as tasks (threads, under the threads backend):
        # their counts and _in_flight are changed under this, never across a switch.
        self._guard = green.native_lock()
        # The last pass ended because the database went away: retried soon.
        self.db_lost = False
        self._idle = green.Event()
        # Set while no pass is due or under way: the power sync may run.
        self._done = green.Event()
        self._done.set()

    # -- deciding ---------------------------------------------------------

    def check_boot(self) -> bool:
        """Compare the boot id with the recorded one; decide whether a pass is due."""
        current = read_boot_id(self.boot_id_path)
        recorded = load_recorded(self.record_path)
        was_boot = current is not None and recorded is not None and current != recorded
        self._boot_id = current
        self.counters.set(was_boot=was_boot)
        if recorded is None and current is not None:
            LOG.info("no recorded boot id: first start on this host, taken as no host boot")
        if was_boot and self.enabled:
            self.due = True
            self.counters.set(state="pending")
            LOG.warning(
                "the host booted since the agent last ran: guests that were running "
                "will be started again before the first power sync"
            )
        else:
            if was_boot:
                LOG.warning(
                    "the host booted since the agent last ran; "
                    "resume_guests_state_on_host_boot is off: the power sync will record "
                    "its guests stopped"
                )
            self.counters.set(state="no-boot" if self.enabled else "off")
            self._record()
        return was_boot

    def _record(self) -> None:
        if self._boot_id is None:
            return
        try:
            green.execute(save_recorded, self.record_path, self._boot_id)
        except OSError as exc:
            LOG.error("cannot record the boot id in %s: %s", self.record_path, exc)

    # -- the gate the power sync waits at ---------------------------------

    def prepare(self) -> bool:
        """Hold the power sync back now if a pass is due; call before spawning the pass."""
        if not self.due or self._stopping:
            return False
        self._done.clear()
        return True

    def release(self) -> None:
        """Let the power sync go, whatever became of the pass."""
        self._done.set()

    def wait_done(self, should_stop: Callable[[], bool], limit: float = SYNC_WAIT_LIMIT_S) -> bool:
        """Wait for a pass under way; False if the agent began stopping meanwhile.

        Each wait is short, so a stop is seen within POLL_S; after ``limit``
        the caller goes on anyway (recording no guest stopped while ``due``).
        """
        if self._done.is_set():
            return True
        LOG.info("power sync waits for the resume after host boot")
        end = green.monotonic() + limit
        while not self._done.wait(POLL_S):
            if should_stop() or self._stopping:
                return False
            if green.monotonic() >= end:
                LOG.warning("power sync waited %.0f s for the resume pass; syncing now", limit)
                return True
        return True

    # -- the pass ---------------------------------------------------------

    def run_pass(self) -> bool:
        """Start every active instance whose domain is off; never raises.

        Runs in the start-up recovery greenthread. The hypervisor going away
        ends it (what is left is retried on reconnection); one instance's
        failure is logged, counted and audited, and the pass goes on. The
        database going away ends it too, but nothing would ever retry it:
        True then, and the caller runs it again soon. The caller opens the
        gate (``release``) once no further pass follows at once: a sync let
        through would record every guest still off as stopped.
        """
        if not self.due:
            return False
        self.db_lost = False
        counters = self.counters
        counters.set(
            state="running",
            last_error=None,
            candidates=0,
            resumed=0,
            failed=0,
            skipped=0,
            max_in_flight=0,
        )
        started = green.monotonic()
        lost: list[str] = []
        try:
            instances = [
                i
                for i in self.db.instance_get_all_by_host(self.host)
                if i.vm_state == VmState.ACTIVE and i.task_state is None
            ]
            counters.set(candidates=len(instances))
            LOG.info(
                "resume after host boot: %d active instance(s) to check, %s at once",
                len(instances),
                self.concurrency or "all",
            )
            slots = green.Semaphore(self.concurrency) if self.concurrency else None
            for inst in instances:
                if not self._take(slots):
                    break
                if lost:  # the hypervisor went away while this one waited for a slot
                    if slots is not None:
                        slots.release()
                    break
                with self._guard:
                    self._in_flight += 1  # counted from here, so the drain below sees it
                    counters.raise_to("max_in_flight", self._in_flight)
                green.spawn(self._one, inst, slots, lost, name="resume-guest")
                green.yield_now()
            self._drain()
        except Exception as exc:  # noqa: BLE001 - the pass must end cleanly, whatever it met
            self.db_lost = self.db_lost or isinstance(exc, exception.DatabaseUnavailable)
            lost.append(f"{type(exc).__name__}: {exc}")
        finally:
            counters.set(duration_s=round(green.monotonic() - started, 3))
            self._finish(lost)
        return bool(lost) and self.db_lost and not (self._stopping or self.should_stop())

    def _finish(self, lost: list[str]) -> None:
        counters = self.counters
        if lost:
            counters.set(state="failed", last_error=lost[0])
            when = "soon" if self.db_lost else "on reconnection"
            LOG.error("resume after host boot failed (retried %s): %s", when, lost[0])
        elif self._stopping or self.should_stop():
            counters.set(state="interrupted")
            LOG.warning("resume after host boot interrupted by the agent stopping")
        else:
            counters.set(state="done")
            self.due = False
            self._record()
        LOG.warning(
            "resume after host boot: %d resumed, %d failed, %d skipped of %d in %.1f s",
            counters.resumed,
            counters.failed,
            counters.skipped,
            counters.candidates,
            counters.duration_s or 0.0,
        )

    def _take(self, slots: Any) -> bool:
        """Wait for a slot, looking at "stopping" between short waits."""
        while not (self._stopping or self.should_stop()):
            if slots is None or slots.acquire(timeout=POLL_S):
                return True
        return False

    def _drain(self) -> None:
        """Wait for the starts under way; a stop leaves them to finish on their own."""
        while self._in_flight > 0 and not (self._stopping or self.should_stop()):
            self._idle.wait(POLL_S)
            self._idle.clear()

    def _one(self, inst: Any, slots: Any, lost: list[str]) -> None:
        claimed = False  # from here on, the operation audits its own failure
        try:
            state = self.driver.power_state(inst)
            if state not in OFF_STATES:
                # It runs (or is paused or suspended): nothing to resume.
                self.counters.add(skipped=1)
                return
            claimed = True
            result = self.operations.resume(inst.uuid, ActionSource.STARTUP, WHY)
            if result.vm_state == VmState.ACTIVE:
                self.counters.add(resumed=1)
                LOG.info("instance %s resumed after host boot", inst.uuid)
            else:
                self.counters.add(failed=1)
                LOG.error(
                    "instance %s: resume after host boot left it %s", inst.uuid, result.vm_state
                )
        except exception.Unavailable as exc:  # the hypervisor or the database
            self.counters.add(failed=1)
            self.db_lost = self.db_lost or isinstance(exc, exception.DatabaseUnavailable)
            lost.append(f"{type(exc).__name__}: {exc}")
        except exception.InstanceInvalidState as exc:
            # Changed meanwhile (an operator's request): theirs to settle.
            self.counters.add(skipped=1)
            LOG.info("instance %s: not resumed: %s", inst.uuid, exc)
        except exception.InstanceNotFound as exc:
            self.counters.add(skipped=1)  # deleted meanwhile
            LOG.info("instance %s: not resumed: %s", inst.uuid, exc)
        except Exception as exc:  # noqa: BLE001 - one guest must not end the pass
            self.counters.add(failed=1)
            LOG.error("instance %s: resume after host boot failed: %s", inst.uuid, exc)
            if not claimed:
                self._audit_failure(inst.uuid, exc)
        finally:
            with self._guard:
                self._in_flight -= 1
                idle = self._in_flight == 0
            if idle:
                self._idle.set()
            if slots is not None:
                slots.release()

    def _audit_failure(self, uuid: str, exc: Exception) -> None:
        """An instance_actions row for a failure met before the operation took over."""
        reason = f"resume after host boot failed: {type(exc).__name__}: {exc}"
        rows = action_rows(
            uuid,
            [Change("domain", None, None)],
            "resume",
            str(ActionSource.STARTUP),
            reason,
            utcnow(),
        )
        try:
            self.db.actions_add(rows)
        except Exception as db_exc:  # noqa: BLE001 - the log line above says it all
            LOG.error("instance %s: could not audit the failed resume: %s", uuid, db_exc)

    # -- stopping ---------------------------------------------------------

    def stop(self) -> None:
        """Start no more guests; the sync's wait and the pass's slot waits end."""
        self._stopping = True

    @property
    def running(self) -> bool:
        return bool(self.counters.state == "running")

    def statistics(self) -> ResumeStatistics:
        return self.counters.snapshot()

    def as_dict(self) -> dict[str, Any]:
        return asdict(self.statistics())
