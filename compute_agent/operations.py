"""Instance operations: build, stop, start, reboot, delete.

Each is a flow of vm_state and task_state written to the database (and to
``instance_actions``) around one driver call, under the per-instance lock
that the power sync and lifecycle events also take. An operation first
claims the instance by setting its task_state with a conditional write; an
instance already busy, or in a vm_state the operation does not apply to, is
refused with InstanceInvalidState before anything is touched.

Builds are bounded by ``[compute] max_concurrent_builds``. A build's row is
written at once with task_state ``queued``, so a build waiting for its turn
is visible (and can be deleted) before it starts.
"""

from __future__ import annotations

import contextlib
import logging
import unicodedata
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from compute_agent import exception, green, steady
from compute_agent.counters import Counters
from compute_agent.db.api import Change, Database, action_rows
from compute_agent.db.models import Instance
from compute_agent.guest_ops import VM_STATE_OF, destroy_until_gone
from compute_agent.locks import KeyedLocks
from compute_agent.states import ActionSource, PowerState, TaskState, VmState
from compute_agent.utils import printable, utcnow
from compute_agent.virt.driver import ComputeDriver
from compute_agent.virt.spec import DomainSpec, render_domain_name, validate_uuid

LOG = logging.getLogger(__name__)

MAX_DISPLAY_NAME = 255
BUILD_FIELDS = ("uuid", "name", "vcpus", "memory_mb")

# The vm_states each operation applies to.
STOPPABLE = frozenset({VmState.ACTIVE, VmState.PAUSED, VmState.SUSPENDED, VmState.ERROR})
STARTABLE = frozenset({VmState.STOPPED})
# A resume after a host boot starts what the cloud still believes runs.
RESUMABLE = frozenset({VmState.ACTIVE})
REBOOTABLE = frozenset({VmState.ACTIVE, VmState.PAUSED, VmState.SUSPENDED, VmState.ERROR})
DELETABLE = frozenset(VmState) - {VmState.DELETED}
# What a stop brings about itself: it counts at once (see steady.wait_steady).
STOPPED_STATES = frozenset({PowerState.SHUTDOWN, PowerState.CRASHED})


@dataclass(frozen=True)
class BuildRequest:
    """A validated build request: the fields of the RPC's ``instance`` payload."""

    uuid: str
    name: str
    vcpus: int
    memory_mb: int

    @classmethod
    def parse(cls, payload: Any) -> BuildRequest:
        if not isinstance(payload, Mapping):
            raise exception.InvalidInput(
                f"instance must be an object with {', '.join(BUILD_FIELDS)}, "
                f"not {type(payload).__name__}"
            )
        missing = [f for f in BUILD_FIELDS if f not in payload]
        if missing:
            raise exception.InvalidInput(f"instance is missing {', '.join(missing)}")
        extra = sorted(printable(k, 40) for k in payload if k not in BUILD_FIELDS)
        if extra:
            raise exception.InvalidInput(f"instance has unknown field(s) {', '.join(extra[:5])}")
        uuid = validate_uuid(payload["uuid"], "instance uuid")
        name = validate_display_name(payload["name"])
        # DomainSpec checks the sizes; the domain name is checked there too.
        DomainSpec("check", uuid, payload["vcpus"], payload["memory_mb"])
        return cls(uuid, name, payload["vcpus"], payload["memory_mb"])


def validate_display_name(name: Any) -> str:
    if not isinstance(name, str):
        raise exception.InvalidInput(f"name must be a string, not {type(name).__name__}")
    if not 1 <= len(name) <= MAX_DISPLAY_NAME or not name.strip():
        raise exception.InvalidInput(f"name must have 1 to {MAX_DISPLAY_NAME} characters")
    bad = [c for c in name if unicodedata.category(c) in ("Cc", "Cf", "Cs", "Co", "Cn")]
    if bad:
        raise exception.InvalidInput(
            f"name holds control or unassigned character(s) such as {bad[0]!r}"
        )
    return name


@dataclass(frozen=True)
class BuildStatistics:
    """Builds waiting for a slot and running now; completed and failed since start."""

    queued: int = 0
    running: int = 0
    completed: int = 0
    failed: int = 0


class InstanceOperations:
    def __init__(
        self,
        db: Database,
        driver: ComputeDriver,
        host: str,
        locks: KeyedLocks,
        *,
        name_template: str,
        shutdown_timeout: float,
        max_concurrent_builds: int,
        steady_delay: float = 0.0,
        watch: steady.SteadyWatch | None = None,
    ) -> None:
        self.db = db
        # ``[libvirt] lifecycle_event_delay``: how long a settle waits out a
        # passing state (a boot's pause, a reboot's shut-off).
        self.steady_delay = steady_delay
        self.watch = watch
        self.driver = driver
        self.host = host
        self.locks = locks
        self.name_template = name_template
        self.shutdown_timeout = shutdown_timeout
        self.max_concurrent_builds = max_concurrent_builds
        self._build_slots = (
            green.Semaphore(max_concurrent_builds) if max_concurrent_builds > 0 else None
        )
        self.builds = Counters(BuildStatistics)  # builds run on many request threads

    def statistics(self) -> BuildStatistics:
        return self.builds.snapshot()

    # -- build ------------------------------------------------------------

    def build(self, payload: Any, source: ActionSource) -> Instance:
        """Validate, record the instance as queued, wait for a build slot, spawn."""
        request = BuildRequest.parse(payload)
        spec = DomainSpec(
            render_domain_name(self.name_template, request.uuid),
            request.uuid,
            request.vcpus,
            request.memory_mb,
        )
        self.db.instance_create(
            {
                "uuid": request.uuid,
                "host": self.host,
                "display_name": request.name,
                "domain_name": spec.name,
                "vm_state": VmState.BUILDING.value,
                "task_state": TaskState.QUEUED.value,
                "power_state": PowerState.NOSTATE.value,
                "vcpus": request.vcpus,
                "memory_mb": request.memory_mb,
            },
            source=str(source),
            reason="build requested",
        )
        self.builds.add(queued=1)
        try:
            with self._build_slot():
                self.builds.add(queued=-1, running=1)
                try:
                    return self._build_locked(request.uuid, spec, source)
                finally:
                    self.builds.add(running=-1)
        except BaseException:
            self.builds.add(failed=1)
            raise

    @contextlib.contextmanager
    def _build_slot(self) -> Iterator[None]:
        if self._build_slots is None:
            yield
            return
        with self._build_slots:
            yield

    def _build_locked(self, uuid: str, spec: DomainSpec, source: ActionSource) -> Instance:
        with self.locks.lock(uuid):
            try:
                inst = self.db.instance_get(uuid, host=self.host)
            except exception.InstanceNotFound:
                raise exception.InstanceInvalidState(
                    f"instance {uuid} was deleted while its build was queued"
                ) from None
            if inst.task_state != TaskState.QUEUED:
                raise exception.InstanceInvalidState(
                    f"instance {uuid} left the queued state ({inst.task_state}); build abandoned"
                )
            self._set(inst, {"task_state": TaskState.SPAWNING}, "build", source, "build started")
            try:
                self.driver.spawn(spec)
            except Exception as exc:
                self._cleanup_failed_build(inst)
                self._fail(inst, "build", source, exc, vm_state=VmState.ERROR)
                raise
            observed = steady.wait_steady(lambda: self._observe(inst), self.steady_delay)
            if self.watch is not None:
                self.watch.forget(inst.uuid)
            self._set(
                inst,
                {
                    "vm_state": VmState.ACTIVE,
                    "task_state": None,
                    "power_state": observed or PowerState.NOSTATE,
                },
                "build",
                source,
                "build finished",
            )
            self.builds.add(completed=1)
            return inst

    def _cleanup_failed_build(self, inst: Instance) -> None:
        """Remove whatever of the domain a failed spawn may have left."""
        try:
            self.driver.destroy(inst)
        except exception.InstanceNotFound:
            pass
        except exception.ForeignDomain as exc:
            LOG.error("instance %s: build failed; %s", inst.uuid, exc)
        except Exception as exc:  # noqa: BLE001 - the build's own error is the one reported
            LOG.error("instance %s: could not clean up after a failed build: %s", inst.uuid, exc)

    # -- power ------------------------------------------------------------

    def stop(self, uuid: str, source: ActionSource) -> Instance:
        """Stop the guest; an instance whose domain is gone is stopped already."""
        with self._claim(uuid, "stop", STOPPABLE, TaskState.POWERING_OFF, source) as inst:
            try:
                self.driver.power_off(inst, timeout=self.shutdown_timeout)
            except exception.InstanceNotFound:
                LOG.warning("instance %s: its domain is missing; recorded as stopped", uuid)
            return self._settle(inst, "stop", source, VmState.STOPPED, STOPPED_STATES)

    def start(self, uuid: str, source: ActionSource) -> Instance:
        """Start the guest; a missing domain is re-created from the instance's spec."""
        with self._claim(uuid, "start", STARTABLE, TaskState.POWERING_ON, source) as inst:
            try:
                self.driver.power_on(inst)
            except exception.InstanceNotFound:
                self._recreate(inst, "start", source)
            return self._settle(inst, "start", source, VmState.ACTIVE)

    def resume(self, uuid: str, source: ActionSource, why: str) -> Instance:
        """Start the guest of an active instance whose domain is off (after a host boot).

        The same flow as ``start`` (claim, power on or re-create, settle), from
        vm_state active; a domain found running meanwhile has nothing to do.
        """
        with self._claim(
            uuid, "resume", RESUMABLE, TaskState.POWERING_ON, source, note=why
        ) as inst:
            if self._observe(inst) != PowerState.RUNNING:
                try:
                    self.driver.power_on(inst)
                except exception.InstanceNotFound:
                    self._recreate(inst, "resume", source)
            return self._settle(inst, "resume", source, VmState.ACTIVE)

    def reboot(self, uuid: str, hard: bool, source: ActionSource) -> Instance:
        """Reboot; a hard reboot of an instance whose domain is gone re-creates it."""
        if not isinstance(hard, bool):
            raise exception.InvalidInput(f"hard must be true or false, not {printable(hard)}")
        action = "reboot_hard" if hard else "reboot"
        with self._claim(uuid, action, REBOOTABLE, TaskState.REBOOTING, source) as inst:
            try:
                self.driver.reboot(inst, hard=hard)
            except exception.InstanceNotFound as exc:
                if not hard:
                    raise exception.InstanceNotFound(
                        inst.uuid, "its domain is missing; reboot --hard re-creates it"
                    ) from exc
                self._recreate(inst, action, source)
            return self._settle(inst, action, source, VmState.ACTIVE)

    def _recreate(self, inst: Instance, action: str, source: ActionSource) -> None:
        """Define and start the instance's domain again from its recorded spec."""
        LOG.warning("instance %s: its domain is missing; re-creating it", inst.uuid)
        note = Change("domain", None, "re-created")
        reason = "its domain was missing: re-created from the instance's spec"
        self.db.actions_add(action_rows(inst.uuid, [note], action, str(source), reason, utcnow()))
        self.driver.spawn(DomainSpec.for_instance(inst))

    # -- delete -----------------------------------------------------------

    def delete(self, uuid: str, source: ActionSource) -> Instance:
        """Destroy and undefine the domain, then soft-delete the row.

        A build still queued may be deleted: it finds its row gone when its
        turn comes and gives up.
        """
        with self._claim(
            uuid,
            "delete",
            DELETABLE,
            TaskState.DELETING,
            source,
            from_tasks=(None, TaskState.QUEUED),
            failed_vm_state=VmState.ERROR,
        ) as inst:
            try:
                self._destroy_until_gone(inst)
            except exception.ForeignDomain as exc:
                LOG.error("instance %s: deleting the row only; %s", uuid, exc)
            self.db.instance_soft_delete(inst, source=str(source), reason="delete requested")
            if self.watch is not None:
                self.watch.forget(inst.uuid)
            LOG.info("instance %s deleted", uuid)
            return inst

    def _destroy_until_gone(self, inst: Instance) -> None:
        destroy_until_gone(self.driver, inst)

    # -- the flow ---------------------------------------------------------

    @contextlib.contextmanager
    def _claim(
        self,
        uuid: Any,
        action: str,
        allowed: frozenset[VmState],
        task: TaskState,
        source: ActionSource,
        *,
        from_tasks: tuple[TaskState | None, ...] = (None,),
        failed_vm_state: VmState | None = None,
        note: str | None = None,
    ) -> Iterator[Instance]:
        """Hold the lock, check and set the task_state; on failure, record it.

        A busy instance is refused before waiting for its lock, so a second
        request never queues behind a long operation only to be refused.
        """
        uuid = validate_uuid(uuid, "instance_uuid")
        self._check(self.db.instance_get(uuid, host=self.host), action, allowed, from_tasks)
        with self.locks.lock(uuid):
            inst = self.db.instance_get(uuid, host=self.host)
            self._check(inst, action, allowed, from_tasks)
            self._set(
                inst,
                {"task_state": task},
                action,
                source,
                f"{action} requested: {note}" if note else f"{action} requested",
                expected={"task_state": inst.task_state, "updated_at": inst.updated_at},
            )
            try:
                yield inst
            except Exception as exc:
                self._fail(inst, action, source, exc, vm_state=failed_vm_state)
                raise

    @staticmethod
    def _check(
        inst: Instance,
        action: str,
        allowed: frozenset[VmState],
        from_tasks: tuple[TaskState | None, ...],
    ) -> None:
        if inst.task_state not in from_tasks:
            raise exception.InstanceInvalidState(
                f"cannot {action} instance {inst.uuid}: it is busy ({inst.task_state})"
            )
        if inst.vm_state not in allowed:
            raise exception.InstanceInvalidState(
                f"cannot {action} instance {inst.uuid} in vm_state {inst.vm_state}; "
                f"allowed from {', '.join(sorted(allowed))}"
            )

    def _settle(
        self,
        inst: Instance,
        action: str,
        source: ActionSource,
        want: VmState,
        expected: frozenset[PowerState] = frozenset(),
    ) -> Instance:
        """Clear the task; vm_state follows what the domain is once it is steady.

        A passing state (QEMU's start-up pause, a reboot's shut-off, an
        out-of-band start racing a stop) is waited out by the one rule of
        ``steady``; the operation's own result (``expected``) counts at once.
        No domain is a stopped instance after a stop, an error otherwise.
        """
        observed = steady.wait_steady(lambda: self._observe(inst), self.steady_delay, expected)
        if self.watch is not None:
            self.watch.forget(inst.uuid)
        if observed is None:
            vm_state = VmState.STOPPED if want is VmState.STOPPED else VmState.ERROR
        else:
            vm_state = VM_STATE_OF.get(observed, want)
        self._set(
            inst,
            {
                "vm_state": vm_state,
                "task_state": None,
                "power_state": observed or PowerState.NOSTATE,
            },
            action,
            source,
            f"{action} finished"
            if vm_state == want
            else f"{action} finished: domain is {observed}",
        )
        return inst

    def _fail(
        self,
        inst: Instance,
        action: str,
        source: ActionSource,
        exc: Exception,
        vm_state: VmState | None,
    ) -> None:
        """Record a failed operation; the task_state is always cleared."""
        reason = f"{action} failed: {type(exc).__name__}: {exc}"
        LOG.error("instance %s: %s", inst.uuid, reason)
        values: dict[str, Any] = {"task_state": None}
        if vm_state is not None:
            values["vm_state"] = vm_state
        observed = self._observe(inst, quiet=True)
        if observed is not None:
            values["power_state"] = observed
        try:
            self._set(inst, values, action, source, reason)
        except Exception as db_exc:  # noqa: BLE001 - start-up recovery clears it then
            LOG.error("instance %s: could not record the failure: %s", inst.uuid, db_exc)

    def _observe(self, inst: Instance, quiet: bool = False) -> PowerState | None:
        """The domain's power state; None if it has none (or, quietly, if unknown)."""
        try:
            return self.driver.power_state(inst)
        except Exception as exc:
            if not quiet:
                raise
            LOG.warning("instance %s: cannot read its state: %s", inst.uuid, exc)
            return None

    def _set(
        self,
        inst: Instance,
        values: Mapping[str, Any],
        action: str,
        source: ActionSource,
        reason: str,
        expected: Mapping[str, Any] | None = None,
    ) -> None:
        plain = {
            k: (v.value if isinstance(v, VmState | TaskState | PowerState) else v)
            for k, v in values.items()
        }
        self.db.instance_update(
            inst, plain, action=action, source=str(source), reason=reason, expected=expected
        )
