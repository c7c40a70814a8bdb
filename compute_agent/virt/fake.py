"""An in-memory driver for unit tests and benchmarks.

Its calls can be made slow the way a C library call is slow (blocking a
native thread of the pool, never the hub), and can be made to fail or to
hang, per method and per domain. It counts every call, so benchmarks report
driver calls measured, not guessed.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from compute_agent import exception, green
from compute_agent.states import PowerState
from compute_agent.virt.driver import ComputeDriver, DomainRef, DomainStats, InstanceInfo
from compute_agent.virt.events import LifecycleEvent, Transition
from compute_agent.virt.spec import DomainSpec, InstanceRef

LOG = logging.getLogger(__name__)
HANG_LIMIT_S = 3600.0

# The event a change of state emits, as libvirt would emit it.
_TRANSITION_TO = {
    PowerState.RUNNING: Transition.STARTED,
    PowerState.PAUSED: Transition.PAUSED,
    PowerState.SHUTDOWN: Transition.STOPPED,
    PowerState.CRASHED: Transition.CRASHED,
    PowerState.SUSPENDED: Transition.SUSPENDED,
}


@dataclass
class FakeDomain:
    name: str
    uuid: str
    state: PowerState = PowerState.RUNNING
    vcpus: int = 1
    memory_mb: int = 64
    cpu_time_ns: int = 0


@dataclass
class Fault:
    """Make calls of one method fail (``raise``) or block forever (``hang``)."""

    kind: str  # "raise" or "hang"
    error: Exception | None = None
    names: set[str] | None = None  # only these domains; None for all
    remaining: int | None = None  # how many more calls; None for unlimited
    hits: int = field(default=0)


class FakeDriver(ComputeDriver):
    def __init__(
        self,
        latency: float = 0.0,
        method_latency: dict[str, float] | None = None,
        bulk: bool = True,
    ):
        super().__init__()
        self.bulk = bulk
        self.latency = latency
        self.method_latency = dict(method_latency or {})
        self.domains: dict[str, FakeDomain] = {}
        self.calls: collections.Counter[str] = collections.Counter()
        # The counts and a fault's remaining hits: calls come from many threads.
        self._calls_guard = green.native_lock()
        self.faults: dict[str, Fault] = {}
        self.ignores_shutdown: set[str] = set()
        # method -> fn(domain name), run once the method has done its work:
        # what happens "meanwhile" in a race (an out-of-band start, a slow boot).
        self.after: dict[str, Callable[[str], None]] = {}
        self._connected = False
        self._release = None

    # -- test controls ----------------------------------------------------

    def add_domain(self, name: str, uuid: str, state: PowerState = PowerState.RUNNING) -> None:
        self.domains[name] = FakeDomain(name, uuid, state)

    def set_state(self, name: str, state: PowerState, emit: bool = True) -> None:
        """Change a domain's state out of band, emitting its event as libvirt would."""
        self._set(self.domains[name], state, emit)

    def emit(self, name: str, transition: Transition, uuid: str | None = None) -> None:
        """Emit an event for ``name`` whatever its state (a stale or spurious event)."""
        dom = self.domains.get(name)
        self._emit_event(LifecycleEvent(name, uuid or (dom.uuid if dom else ""), transition))

    def _set(self, dom: FakeDomain, state: PowerState, emit: bool = True) -> None:
        old, dom.state = dom.state, state
        if not emit or old == state:
            return
        transition: Transition | None
        if old == PowerState.PAUSED and state == PowerState.RUNNING:
            transition = Transition.RESUMED
        else:
            transition = _TRANSITION_TO.get(state)
        if transition is not None:
            self._emit_event(LifecycleEvent(dom.name, dom.uuid, transition))

    def inject_fault(
        self,
        method: str,
        kind: str = "raise",
        error: Exception | None = None,
        names: set[str] | None = None,
        count: int | None = None,
    ) -> Fault:
        if kind not in ("raise", "hang"):
            raise ValueError(f"unknown fault kind {kind}")
        fault = Fault(kind, error or RuntimeError(f"injected fault in {method}"), names, count)
        self.faults[method] = fault
        return fault

    def clear_faults(self) -> None:
        """Remove every fault and let hung calls return (with an error)."""
        self.faults.clear()
        if self._release is not None:
            self._release.set()
            self._release = None

    def disconnect(self, reason: str = "fake connection lost") -> None:
        self._connected = False
        self._notify_connection(False, reason)

    def reconnect(self) -> None:
        self._connected = True
        self._notify_connection(True, "fake connection restored")

    # -- the call path: count, fault, latency -----------------------------

    def _call(self, method: str, name: str | None = None) -> None:
        with self._calls_guard:
            self.calls[method] += 1
        if not self._connected:
            raise exception.HypervisorUnavailable("fake hypervisor is not connected")
        delay = self.method_latency.get(method, self.latency)
        fault = self.faults.get(method)
        if fault is not None and (fault.names is None or name in fault.names):
            with self._calls_guard:  # n remaining hits fail exactly n calls
                hit = fault.remaining is None or fault.remaining > 0
                if hit:
                    fault.hits += 1
                    if fault.remaining is not None:
                        fault.remaining -= 1
            if hit:
                if fault.kind == "hang":
                    self._hang()
                    raise exception.HypervisorUnavailable(f"{method} hung and was released")
                assert fault.error is not None
                raise fault.error
        if delay > 0:
            green.execute(green.native_sleep, delay)

    def _after(self, method: str, name: str) -> None:
        hook = self.after.get(method)
        if hook is not None:
            hook(name)

    def _hang(self) -> None:
        release = self._release
        if release is None:
            release = self._release = green.native_event()
        green.execute(release.wait, HANG_LIMIT_S)

    def _lookup(self, instance: InstanceRef) -> FakeDomain:
        dom = self.domains.get(instance.domain_name)
        if dom is None:
            raise exception.InstanceNotFound(instance.uuid, f"no domain {instance.domain_name}")
        if dom.uuid != instance.uuid:
            raise exception.ForeignDomain(
                f"domain {dom.name} has UUID {dom.uuid}, not instance {instance.uuid}"
            )
        return dom

    # -- the driver interface ---------------------------------------------

    def init_host(self, host: str) -> None:
        with self._calls_guard:
            self.calls["init_host"] += 1
        self._connected = True

    def cleanup_host(self) -> None:
        self._connected = False

    @property
    def connected(self) -> bool:
        return self._connected

    def instance_exists(self, instance: InstanceRef) -> bool:
        self._call("instance_exists", instance.domain_name)
        try:
            self._lookup(instance)
        except exception.InstanceNotFound:
            return False
        return True

    def get_info(self, instance: InstanceRef) -> InstanceInfo:
        self._call("get_info", instance.domain_name)
        dom = self._lookup(instance)
        kb = dom.memory_mb * 1024
        return InstanceInfo(dom.state, kb, kb, dom.vcpus, dom.cpu_time_ns)

    def get_num_instances(self) -> int:
        self._call("get_num_instances")
        return len(self.domains)

    def list_domains(self) -> list[DomainRef]:
        self._call("list_domains")
        return [DomainRef(d.name, d.uuid) for d in self.domains.values()]

    def get_power_states(self, instances: Iterable[InstanceRef]) -> dict[str, PowerState | None]:
        """One call for every state, like libvirt's getAllDomainStats (unless bulk=False)."""
        if not self.bulk:
            return super().get_power_states(instances)
        self._call("get_all_states")
        states: dict[str, PowerState | None] = {}
        for inst in instances:
            dom = self.domains.get(inst.domain_name)
            if dom is None:
                states[inst.uuid] = None
            elif dom.uuid == inst.uuid:
                states[inst.uuid] = dom.state
        return states

    # -- statistics -------------------------------------------------------

    @property
    def has_bulk_stats(self) -> bool:
        return self.bulk

    def _sample(self, dom: FakeDomain, complete: bool = True) -> DomainStats:
        running = dom.state in (PowerState.RUNNING, PowerState.PAUSED)
        kb = dom.memory_mb * 1024
        return DomainStats(
            dom.name,
            dom.uuid,
            dom.state,
            complete=complete,
            cpu_time_ns=dom.cpu_time_ns,
            vcpus=dom.vcpus,
            memory_kb=kb,
            memory_max_kb=kb,
            memory_rss_kb=kb if running and complete else None,
        )

    def get_all_stats(self) -> dict[str, DomainStats]:
        """One call for all; a domain with a fault on ``get_stats`` comes back
        incomplete at once, as libvirt's NOWAIT reports a domain whose job is taken."""
        if not self.bulk:
            raise NotImplementedError("this fake driver has no bulk statistics call")
        self._call("get_all_stats")
        fault = self.faults.get("get_stats")
        stuck = set() if fault is None else (fault.names or set(self.domains))
        return {d.name: self._sample(d, d.name not in stuck) for d in self.domains.values()}

    def get_stats(self, instance: InstanceRef) -> DomainStats:
        self._call("get_stats", instance.domain_name)
        return self._sample(self._lookup(instance))

    # -- operations -------------------------------------------------------

    def spawn(self, spec: DomainSpec) -> None:
        self._call("define", spec.name)
        if spec.name in self.domains:
            raise exception.InstanceExists(f"domain {spec.name} already exists")
        self.domains[spec.name] = FakeDomain(
            spec.name, spec.uuid, PowerState.SHUTDOWN, spec.vcpus, spec.memory_mb
        )
        try:
            self._call("start", spec.name)
        except Exception:
            del self.domains[spec.name]
            raise
        self._set(self.domains[spec.name], PowerState.RUNNING)

    def destroy(self, instance: InstanceRef) -> None:
        self._call("destroy", instance.domain_name)
        dom = self._lookup(instance)
        self._set(dom, PowerState.SHUTDOWN)
        del self.domains[instance.domain_name]
        self._emit_event(LifecycleEvent(dom.name, dom.uuid, Transition.UNDEFINED))
        self._after("destroy", dom.name)

    def power_off(self, instance: InstanceRef, timeout: float = 60) -> None:
        self._call("power_off", instance.domain_name)
        dom = self._lookup(instance)
        if timeout > 0 and dom.name in self.ignores_shutdown:
            green.sleep(timeout)  # the guest ignores the request; force it after the wait
        self._set(dom, PowerState.SHUTDOWN)
        self._after("power_off", dom.name)

    def power_on(self, instance: InstanceRef) -> None:
        self._call("power_on", instance.domain_name)
        self._set(self._lookup(instance), PowerState.RUNNING)
        self._after("power_on", instance.domain_name)

    def reboot(self, instance: InstanceRef, hard: bool = False) -> None:
        if not hard:
            try:
                self._call("reboot", instance.domain_name)
            except (exception.HypervisorUnavailable, exception.InstanceNotFound):
                raise
            except Exception as exc:  # noqa: BLE001 - any soft failure falls back to hard
                LOG.warning("soft reboot of %s failed (%s); rebooting hard", instance.uuid, exc)
                hard = True
        if hard:
            self._call("reboot_hard", instance.domain_name)
            # A hard reboot is a destroy and a start: STOPPED, then STARTED.
            self._set(self._lookup(instance), PowerState.SHUTDOWN)
        self._set(self._lookup(instance), PowerState.RUNNING)
        self._after("reboot_hard" if hard else "reboot", instance.domain_name)
