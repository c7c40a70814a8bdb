"""The libvirt driver.

Instances are found with one ``lookupByName`` and then checked by UUID:
listing every domain to find one is the mistake this project exists to
avoid, and a domain with the right name but another UUID belongs to
someone else. Every function named ``_..._native`` runs in the thread pool
(through ``Host.run``) and may call libvirt freely; nothing else does.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import libvirt
from oslo_config import cfg

from compute_agent import exception, green
from compute_agent.states import PowerState
from compute_agent.virt.driver import (
    ComputeDriver,
    DomainRef,
    DomainStats,
    DriverStatistics,
    InstanceInfo,
)
from compute_agent.virt.events import LifecycleEvent, Transition
from compute_agent.virt.libvirt import domain_xml
from compute_agent.virt.libvirt.host import Host, is_connection_error
from compute_agent.virt.spec import DomainSpec, InstanceRef

LOG = logging.getLogger(__name__)

T = TypeVar("T")
# A call run on the libvirt thread: fn(raw_connection, domain_name, uuid).
_Native = Callable[[Any, str, str], T]

POWER_STATES = {
    libvirt.VIR_DOMAIN_NOSTATE: PowerState.NOSTATE,
    libvirt.VIR_DOMAIN_RUNNING: PowerState.RUNNING,
    libvirt.VIR_DOMAIN_BLOCKED: PowerState.RUNNING,
    libvirt.VIR_DOMAIN_PAUSED: PowerState.PAUSED,
    libvirt.VIR_DOMAIN_SHUTDOWN: PowerState.SHUTDOWN,
    libvirt.VIR_DOMAIN_SHUTOFF: PowerState.SHUTDOWN,
    libvirt.VIR_DOMAIN_CRASHED: PowerState.CRASHED,
    libvirt.VIR_DOMAIN_PMSUSPENDED: PowerState.SUSPENDED,
}

# libvirt's lifecycle events that change what the agent records. DEFINED
# changes nothing, and SHUTDOWN only says a guest began to shut down: the
# STOPPED that follows is what counts.
TRANSITIONS = {
    libvirt.VIR_DOMAIN_EVENT_STARTED: Transition.STARTED,
    libvirt.VIR_DOMAIN_EVENT_STOPPED: Transition.STOPPED,
    libvirt.VIR_DOMAIN_EVENT_SUSPENDED: Transition.PAUSED,
    libvirt.VIR_DOMAIN_EVENT_RESUMED: Transition.RESUMED,
    libvirt.VIR_DOMAIN_EVENT_PMSUSPENDED: Transition.SUSPENDED,
    libvirt.VIR_DOMAIN_EVENT_CRASHED: Transition.CRASHED,
    libvirt.VIR_DOMAIN_EVENT_UNDEFINED: Transition.UNDEFINED,
}

STATS_GROUPS = (
    libvirt.VIR_DOMAIN_STATS_STATE
    | libvirt.VIR_DOMAIN_STATS_CPU_TOTAL
    | libvirt.VIR_DOMAIN_STATS_BALLOON
    | libvirt.VIR_DOMAIN_STATS_VCPU
    | libvirt.VIR_DOMAIN_STATS_INTERFACE
    | libvirt.VIR_DOMAIN_STATS_BLOCK
)
# Do not wait for a domain whose QEMU job is taken (by a hung monitor call):
# report what needs no monitor and leave the rest out.
STATS_NOWAIT = libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_NOWAIT
# Fields only a QEMU monitor answer provides (measured on libvirt 9.0 with
# QEMU 7.2: NOWAIT leaves both out for a domain whose job is taken). A
# running QEMU guest's record without them is an incomplete sample.
MONITOR_FIELDS = ("balloon.rss", "balloon.last-update")

_UNDEFINE_FLAGS = (
    libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
    | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
    | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
)
SHUTDOWN_POLL_S = 0.5
# How long a start waits for a domain that another start is bringing up.
START_WAIT_S = 60.0
# libvirt refusals that mean the domain's state did not allow the call.
_STATE_CODES = frozenset(
    {
        libvirt.VIR_ERR_OPERATION_INVALID,
        libvirt.VIR_ERR_OPERATION_DENIED,
        libvirt.VIR_ERR_OPERATION_UNSUPPORTED,
        libvirt.VIR_ERR_NO_SUPPORT,
    }
)


def power_state(libvirt_state: int) -> PowerState:
    return POWER_STATES.get(libvirt_state, PowerState.NOSTATE)


def _find_native(conn: Any, name: str, uuid: str) -> Any:
    """The domain called ``name`` if its UUID is ``uuid``."""
    try:
        dom = conn.lookupByName(name)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            raise exception.InstanceNotFound(uuid, f"no domain named {name}") from None
        raise
    found = dom.UUIDString()
    if found.lower() != uuid.lower():
        raise exception.ForeignDomain(
            f"domain {name} has UUID {found}, not instance {uuid}'s: not ours, left alone"
        )
    return dom


def _info_native(conn: Any, name: str, uuid: str) -> InstanceInfo:
    state, max_mem, mem, cpus, cpu_time = _find_native(conn, name, uuid).info()
    return InstanceInfo(power_state(state), max_mem, mem, cpus, cpu_time)


def _state_native(conn: Any, name: str, uuid: str) -> PowerState:
    return power_state(_find_native(conn, name, uuid).state()[0])


def _states_each_native(conn: Any, refs: list[tuple[str, str]]) -> dict[str, PowerState | None]:
    """``lookupByName`` then ``state()`` for each (name, uuid), in one trip.

    None: no such domain. A domain that is not the instance's (another
    UUID), or whose read failed for another reason, is left out: the
    caller's own read of it reports why.
    """
    states: dict[str, PowerState | None] = {}
    for name, uuid in refs:
        try:
            states[uuid] = _state_native(conn, name, uuid)
        except exception.InstanceNotFound:
            states[uuid] = None
        except exception.ForeignDomain:
            continue
        except libvirt.libvirtError as exc:
            if is_connection_error(exc):
                raise
            if _code(exc) == libvirt.VIR_ERR_NO_DOMAIN:
                states[uuid] = None  # gone between its lookup and its read
    return states


def _type_native(conn: Any) -> str:
    kind: str = conn.getType()
    return kind


def _count_native(conn: Any) -> int:
    count: int = conn.numOfDomains() + conn.numOfDefinedDomains()
    return count


def _list_native(conn: Any) -> list[DomainRef]:
    # name() and UUIDString() read the domain object; no further round trip.
    return [DomainRef(d.name(), d.UUIDString().lower()) for d in conn.listAllDomains(0)]


def _bulk_states_native(conn: Any) -> dict[str, tuple[str, PowerState]]:
    records = conn.getAllDomainStats(libvirt.VIR_DOMAIN_STATS_STATE, 0)
    return {
        dom.name(): (dom.UUIDString().lower(), power_state(stats.get("state.state", 0)))
        for dom, stats in records
    }


def _sum(stats: dict[str, Any], prefix: str, suffix: str) -> int | None:
    """Sum ``prefix.N.suffix`` over the ``prefix.count`` devices, or None."""
    count = stats.get(f"{prefix}.count")
    if count is None:
        return None
    return sum(int(stats.get(f"{prefix}.{i}.{suffix}", 0)) for i in range(count))


def stats_from_record(name: str, uuid: str, stats: dict[str, Any], monitored: bool) -> DomainStats:
    """A DomainStats from one ``getAllDomainStats`` record.

    ``monitored``: the domain has a QEMU monitor (not the test driver), so a
    running one whose record lacks MONITOR_FIELDS was skipped by NOWAIT.
    """
    state = power_state(stats.get("state.state", 0))
    running = state in (PowerState.RUNNING, PowerState.PAUSED)
    complete = not (monitored and running and not all(f in stats for f in MONITOR_FIELDS))
    return DomainStats(
        name=name,
        uuid=uuid.lower(),
        state=state,
        complete=complete,
        cpu_time_ns=stats.get("cpu.time"),
        vcpus=stats.get("vcpu.current"),
        memory_kb=stats.get("balloon.current"),
        memory_max_kb=stats.get("balloon.maximum"),
        memory_rss_kb=stats.get("balloon.rss"),
        net_rx_bytes=_sum(stats, "net", "rx.bytes"),
        net_tx_bytes=_sum(stats, "net", "tx.bytes"),
        block_rd_bytes=_sum(stats, "block", "rd.bytes"),
        block_wr_bytes=_sum(stats, "block", "wr.bytes"),
    )


def _all_stats_native(conn: Any, monitored: bool) -> dict[str, DomainStats]:
    records = conn.getAllDomainStats(STATS_GROUPS, STATS_NOWAIT)
    return {
        dom.name(): stats_from_record(dom.name(), dom.UUIDString(), stats, monitored)
        for dom, stats in records
    }


def _stats_native(conn: Any, name: str, uuid: str, monitored: bool) -> DomainStats:
    dom = _find_native(conn, name, uuid)
    records = conn.domainListGetStats([dom], STATS_GROUPS, STATS_NOWAIT)
    if not records:
        raise exception.InstanceNotFound(uuid, f"no statistics for domain {name}")
    return stats_from_record(name, uuid, records[0][1], monitored)


def _spawn_native(conn: Any, xml: str) -> None:
    dom = conn.defineXML(xml)
    try:
        dom.create()
    except libvirt.libvirtError:
        try:
            dom.undefine()
        except libvirt.libvirtError as cleanup_exc:
            LOG.error("could not undefine %s after failed start: %s", dom.name(), cleanup_exc)
        raise


def _code(exc: libvirt.libvirtError) -> int | None:
    code: int | None = exc.get_error_code()
    return code


def _undefine(dom: Any) -> None:
    try:
        dom.undefineFlags(_UNDEFINE_FLAGS)
    except libvirt.libvirtError as exc:
        # Drivers without managed save or NVRAM reject the flags themselves.
        if _code(exc) not in (libvirt.VIR_ERR_NO_SUPPORT, libvirt.VIR_ERR_INVALID_ARG):
            raise
        dom.undefine()


def _destroy_if_active(dom: Any) -> None:
    """Force the domain off; one that stopped (or vanished) meanwhile is off."""
    try:
        if dom.isActive():
            dom.destroy()
    except libvirt.libvirtError as exc:
        if _code(exc) not in (libvirt.VIR_ERR_OPERATION_INVALID, libvirt.VIR_ERR_NO_DOMAIN):
            raise


def _create_unless_running(dom: Any) -> None:
    """Start the domain; one already running (started meanwhile) is a success.

    QEMU says so with VIR_ERR_OPERATION_INVALID, the test driver with an
    internal error: whatever the code, a domain found active is started.
    """
    try:
        dom.create()
    except libvirt.libvirtError as exc:
        if dom.isActive():
            LOG.info("domain %s was started meanwhile: %s", dom.name(), exc.get_error_message())
            return
        raise


def _destroy_native(conn: Any, name: str, uuid: str) -> None:
    """Undefine first, then destroy: nothing can start the domain in between.

    Destroying first left a window (a QEMU takes seconds to die) in which a
    concurrent start ran the domain again, and the undefine then made it a
    running transient domain that nobody owns. Undefined first, a running
    domain becomes transient and the destroy removes it; an inactive one is
    gone at once. The caller checks that nothing came back.
    """
    dom = _find_native(conn, name, uuid)
    _undefine(dom)
    _destroy_if_active(dom)


def _shutdown_native(conn: Any, name: str, uuid: str) -> bool:
    """Ask the guest to shut down; False if it is not running."""
    dom = _find_native(conn, name, uuid)
    if not dom.isActive():
        return False
    try:
        dom.shutdown()
    except libvirt.libvirtError as exc:
        if _code(exc) == libvirt.VIR_ERR_OPERATION_INVALID and not dom.isActive():
            return False  # it stopped meanwhile
        raise
    return True


def _force_off_native(conn: Any, name: str, uuid: str) -> None:
    _destroy_if_active(_find_native(conn, name, uuid))


def _power_on_native(conn: Any, name: str, uuid: str) -> None:
    """Make the domain run, acting on what it finds: a domain that is (or
    became) running, or is still starting up, is started."""
    dom = _find_native(conn, name, uuid)
    state, reason = dom.state()
    try:
        if state == libvirt.VIR_DOMAIN_PAUSED and reason != libvirt.VIR_DOMAIN_PAUSED_STARTING_UP:
            dom.resume()
        elif state == libvirt.VIR_DOMAIN_PMSUSPENDED:
            dom.pMWakeup(0)
        elif not dom.isActive():
            _create_unless_running(dom)
    except libvirt.libvirtError:
        # A resume or wake-up refused because a start raced it: running is the goal.
        if not _running(dom):
            raise


def _starting_native(conn: Any, name: str, uuid: str) -> bool:
    """Whether QEMU is still starting the domain (paused until it runs)."""
    state, reason = _find_native(conn, name, uuid).state()
    return bool(
        state == libvirt.VIR_DOMAIN_PAUSED and reason == libvirt.VIR_DOMAIN_PAUSED_STARTING_UP
    )


def _running(dom: Any) -> bool:
    return dom.state()[0] in (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_BLOCKED)


def _soft_reboot_native(conn: Any, name: str, uuid: str) -> None:
    _find_native(conn, name, uuid).reboot(0)


def _hard_reboot_native(conn: Any, name: str, uuid: str) -> None:
    dom = _find_native(conn, name, uuid)
    _destroy_if_active(dom)
    _create_unless_running(dom)


def typed_error(exc: libvirt.libvirtError, what: str, uuid: str) -> Exception:
    """The agent's typed error for a libvirt refusal of ``what`` on an instance."""
    said = exc.get_error_message() or str(exc)
    message = f"libvirt refused to {what} instance {uuid}: {said}"
    code = _code(exc)
    if code == libvirt.VIR_ERR_NO_DOMAIN:
        return exception.InstanceNotFound(uuid, f"libvirt: {said}")
    if code in _STATE_CODES:
        return exception.InstanceInvalidState(message)
    return exception.HypervisorUnavailable(message)


class LibvirtDriver(ComputeDriver):
    def __init__(self, conf: cfg.ConfigOpts) -> None:
        super().__init__()
        group = conf.libvirt
        self._virt_type_opt: str = group.virt_type
        self.virt_type = "test"
        self.host = Host(
            group.connection_uri,
            self._notify_connection,
            self._on_lifecycle,
            reconnect_min=group.reconnect_min_delay,
            reconnect_max=group.reconnect_max_delay,
            keepalive=(group.keepalive_interval, group.keepalive_count),
            pool_size=group.connection_pool_size,
            stuck_after=group.stuck_call_timeout,
            max_stuck=group.max_stuck_connections,
        )

    # -- connection -------------------------------------------------------

    def init_host(self, host: str) -> None:
        self.host.start(events=self._event_listener is not None)
        self.virt_type = self._pick_virt_type()
        LOG.info("libvirt driver for %s ready, virt_type %s", self.host.uri, self.virt_type)

    def _pick_virt_type(self) -> str:
        if self._virt_type_opt != "auto":
            return self._virt_type_opt
        if self.host.run(_type_native).lower() == "test":
            return "test"
        return "kvm" if os.path.exists("/dev/kvm") else "qemu"

    def cleanup_host(self) -> None:
        self.host.stop()

    @property
    def connected(self) -> bool:
        return self.host.connected

    def statistics(self) -> DriverStatistics:
        host = self.host
        return DriverStatistics(
            uri=host.uri,
            connected=host.connected,
            last_error=host.last_error,
            in_flight=host.inflight,
            connections=host.pool.statistics(),
        )

    def _on_lifecycle(self, name: str, uuid: str, event: int, detail: int) -> None:
        transition = TRANSITIONS.get(event)
        if transition is None:
            return
        self._emit_event(LifecycleEvent(name, uuid.lower(), transition, f"detail {detail}"))

    # -- queries ----------------------------------------------------------

    def _run(self, fn: _Native[T], instance: InstanceRef) -> T:
        return self.host.run(fn, instance.domain_name, instance.uuid)

    def instance_exists(self, instance: InstanceRef) -> bool:
        try:
            self._run(_find_native, instance)
        except exception.InstanceNotFound:
            return False
        return True

    def _query(self, fn: _Native[T], instance: InstanceRef) -> T:
        """Run a read; a domain that vanished between lookup and read is not found."""
        try:
            return self._run(fn, instance)
        except libvirt.libvirtError as exc:
            if _code(exc) == libvirt.VIR_ERR_NO_DOMAIN:
                raise typed_error(exc, "read", instance.uuid) from exc
            raise

    def get_info(self, instance: InstanceRef) -> InstanceInfo:
        return self._query(_info_native, instance)

    def get_state(self, instance: InstanceRef) -> PowerState:
        return self._query(_state_native, instance)

    def power_state(self, instance: InstanceRef) -> PowerState | None:
        """``dom.state()``, which never waits on the guest's QEMU, unlike ``dom.info()``."""
        try:
            return self.get_state(instance)
        except exception.InstanceNotFound:
            return None

    def power_states_each(self, instances: Iterable[InstanceRef]) -> dict[str, PowerState | None]:
        """Each instance's own lookup and state read, all in one trip."""
        refs = [(i.domain_name, i.uuid) for i in instances]
        return self.host.run(_states_each_native, refs) if refs else {}

    def get_num_instances(self) -> int:
        return self.host.run(_count_native)

    def list_domains(self) -> list[DomainRef]:
        return self.host.run(_list_native)

    def get_power_states(self, instances: Iterable[InstanceRef]) -> dict[str, PowerState | None]:
        """Every state from one ``getAllDomainStats`` call, matched by name and UUID."""
        by_name = self.host.run(_bulk_states_native)
        states: dict[str, PowerState | None] = {}
        for inst in instances:
            found = by_name.get(inst.domain_name)
            if found is None:
                states[inst.uuid] = None
            elif found[0] != inst.uuid.lower():
                # Left out: the caller's per-instance read raises ForeignDomain.
                LOG.error(
                    "domain %s has UUID %s, not instance %s's: a foreign domain, left alone",
                    inst.domain_name,
                    found[0],
                    inst.uuid,
                )
            else:
                states[inst.uuid] = found[1]
        return states

    # -- statistics -------------------------------------------------------

    @property
    def _monitored(self) -> bool:
        return self.virt_type != "test"

    @property
    def has_bulk_stats(self) -> bool:
        return True

    def get_all_stats(self) -> dict[str, DomainStats]:
        return self.host.run(_all_stats_native, self._monitored)

    def get_stats(self, instance: InstanceRef) -> DomainStats:
        return self.host.run(_stats_native, instance.domain_name, instance.uuid, self._monitored)

    # -- operations -------------------------------------------------------

    def _act(self, fn: _Native[T], instance: InstanceRef, what: str) -> T:
        """Run an operation; a libvirt refusal becomes a typed error, never a raw one."""
        try:
            return self._run(fn, instance)
        except libvirt.libvirtError as exc:
            raise typed_error(exc, what, instance.uuid) from exc

    def spawn(self, spec: DomainSpec) -> None:
        try:
            self.host.run(_spawn_native, domain_xml.build(spec, self.virt_type))
        except libvirt.libvirtError as exc:
            raise typed_error(exc, "create", spec.uuid) from exc

    def destroy(self, instance: InstanceRef) -> None:
        self._act(_destroy_native, instance, "destroy")

    def power_off(self, instance: InstanceRef, timeout: float = 60) -> None:
        if timeout > 0:
            try:
                if not self._run(_shutdown_native, instance):
                    return
            except libvirt.libvirtError as exc:
                LOG.warning("graceful shutdown of %s refused (%s); forcing off", instance.uuid, exc)
            else:
                deadline = green.monotonic() + timeout
                while green.monotonic() < deadline:
                    green.sleep(SHUTDOWN_POLL_S)
                    if self.get_state(instance) == PowerState.SHUTDOWN:
                        return
                LOG.warning("%s did not shut down within %s s; forcing off", instance.uuid, timeout)
        self._act(_force_off_native, instance, "force off")

    def power_on(self, instance: InstanceRef) -> None:
        """Start the domain and return once it runs, as ``create()`` itself does:
        a domain found starting (a start raced this one) is waited for."""
        self._act(_power_on_native, instance, "start")
        deadline = green.monotonic() + START_WAIT_S
        while self._act(_starting_native, instance, "start") and green.monotonic() < deadline:
            green.sleep(SHUTDOWN_POLL_S / 5)

    def reboot(self, instance: InstanceRef, hard: bool = False) -> None:
        if not hard:
            try:
                self._run(_soft_reboot_native, instance)
                return
            except libvirt.libvirtError as exc:
                LOG.warning("soft reboot of %s failed (%s); rebooting hard", instance.uuid, exc)
        self._act(_hard_reboot_native, instance, "hard reboot")
