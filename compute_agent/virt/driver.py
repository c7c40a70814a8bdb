"""The virt driver interface, in nova's vocabulary, without nova's size.

Every method identifies an instance by its domain name *and* UUID: a domain
found by name whose UUID differs belongs to someone else and is never
touched (ForeignDomain). Drivers raise InstanceNotFound for a missing domain
and HypervisorUnavailable when the hypervisor cannot be reached.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from compute_agent import exception, green
from compute_agent.states import PowerState
from compute_agent.virt.events import EventListener, LifecycleEvent
from compute_agent.virt.spec import DomainSpec, InstanceRef

# (up, reason): called on the hub when the hypervisor connection drops or returns.
ConnectionListener = Callable[[bool, str], None]


@dataclass(frozen=True)
class InstanceInfo:
    """What ``dom.info()`` tells, in agent terms."""

    state: PowerState
    max_mem_kb: int
    mem_kb: int
    num_cpu: int
    cpu_time_ns: int


@dataclass(frozen=True)
class DomainStats:
    """One statistics sample of a domain; a field is None when not reported.

    ``complete`` is False when the hypervisor answered for the domain but
    left out what only its (hung or busy) QEMU could say; such a sample
    does not count as a fresh one.
    """

    name: str
    uuid: str
    state: PowerState
    complete: bool = True
    cpu_time_ns: int | None = None
    vcpus: int | None = None
    memory_kb: int | None = None
    memory_max_kb: int | None = None
    memory_rss_kb: int | None = None
    net_rx_bytes: int | None = None
    net_tx_bytes: int | None = None
    block_rd_bytes: int | None = None
    block_wr_bytes: int | None = None


@dataclass(frozen=True)
class DomainRef:
    """A domain as listed by the hypervisor."""

    name: str
    uuid: str


@dataclass(frozen=True)
class ConnectionStatistics:
    """The connections that carry a driver's calls, each one call at a time."""

    size: int  # at most this many carry calls
    open: int  # opened and not yet closed: idle, busy and set aside
    busy: int  # carrying a call now (set-aside ones included)
    stuck: int  # set aside now: a call ran past the stuck deadline in them
    stuck_total: int  # set aside since start
    opened_total: int  # opened since start


@dataclass(frozen=True)
class DriverStatistics:
    """What ``status`` shows of the driver's hypervisor connection."""

    uri: str
    connected: bool
    last_error: str | None  # why the connection was last lost or refused
    in_flight: int  # calls running now
    connections: ConnectionStatistics | None = None


class ComputeDriver(abc.ABC):
    """What the compute manager needs of a hypervisor."""

    def __init__(self) -> None:
        self._listeners: list[ConnectionListener] = []
        self._event_listener: EventListener | None = None

    # -- connection -------------------------------------------------------

    @abc.abstractmethod
    def init_host(self, host: str) -> None:
        """Connect; raise HypervisorUnavailable if the hypervisor cannot be reached."""

    def cleanup_host(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        """Release the connection when the agent stops."""

    @property
    def connected(self) -> bool:
        return True

    def statistics(self) -> DriverStatistics | None:
        """The connection's figures; None for a driver without a connection to describe."""
        return None

    def add_connection_listener(self, listener: ConnectionListener) -> None:
        self._listeners.append(listener)

    def _notify_connection(self, up: bool, reason: str) -> None:
        for listener in list(self._listeners):
            listener(up, reason)

    # -- lifecycle events -------------------------------------------------

    def set_event_listener(self, listener: EventListener | None) -> None:
        """Receive lifecycle events (set before ``init_host``); None stops them."""
        self._event_listener = listener

    def _emit_event(self, event: LifecycleEvent) -> None:
        if self._event_listener is not None:
            self._event_listener(event)

    # -- queries ----------------------------------------------------------

    @abc.abstractmethod
    def instance_exists(self, instance: InstanceRef) -> bool:
        """One lookup by name, then a UUID check; never a listing."""

    @abc.abstractmethod
    def get_info(self, instance: InstanceRef) -> InstanceInfo:
        """Raise InstanceNotFound if no domain has the instance's name and UUID."""

    def power_state(self, instance: InstanceRef) -> PowerState | None:
        """The instance's power state; None when no domain has its name.

        The one read of "this instance's state, or none". A domain with the
        instance's name but another UUID raises ForeignDomain: a sync or an
        operation reports it as an error, while a caller that only settles
        this instance's own record (start-up recovery) treats it as missing,
        since it may never touch that domain either way.
        """
        try:
            return self.get_info(instance).state
        except exception.InstanceNotFound:
            return None

    @abc.abstractmethod
    def get_num_instances(self) -> int:
        """How many domains there are, counted without listing them."""

    @abc.abstractmethod
    def list_domains(self) -> list[DomainRef]:
        """Every domain on the host, running or not, with its UUID."""

    def list_instances(self) -> list[str]:
        return [d.name for d in self.list_domains()]

    def get_power_states(self, instances: Iterable[InstanceRef]) -> dict[str, PowerState | None]:
        """Power state of each instance by UUID (None when its domain is missing).

        An instance whose name is taken by a foreign domain is left out, so
        that the caller's own per-instance read reports it. The default asks
        per instance and yields after each; drivers with a bulk call override it.
        """
        states: dict[str, PowerState | None] = {}
        for inst in instances:
            try:
                states[inst.uuid] = self.get_info(inst).state
            except exception.InstanceNotFound:
                states[inst.uuid] = None
            except exception.ForeignDomain:
                pass
            green.yield_now()
        return states

    def power_states_each(self, instances: Iterable[InstanceRef]) -> dict[str, PowerState | None]:
        """The reads a batch can get in one trip to the driver's native thread.

        Each instance still has its own lookup and read (as :meth:`power_state`),
        by UUID; what is left out (a foreign domain, a failed read) the caller
        reads on its own. The default leaves every instance out: a driver
        without such a trip gains nothing from reading ahead.
        """
        return {}

    # -- statistics -------------------------------------------------------

    @property
    def has_bulk_stats(self) -> bool:
        """Whether :meth:`get_all_stats` samples every domain in one call."""
        return False

    def get_all_stats(self) -> dict[str, DomainStats]:
        """Every domain's sample by domain name, in one call that never waits for
        a busy domain (it is reported incomplete instead)."""
        raise NotImplementedError

    @abc.abstractmethod
    def get_stats(self, instance: InstanceRef) -> DomainStats:
        """One instance's sample; raise InstanceNotFound if its domain is missing."""

    # -- operations -------------------------------------------------------

    @abc.abstractmethod
    def spawn(self, spec: DomainSpec) -> None:
        """Define and start a domain; on failure leave nothing behind."""

    @abc.abstractmethod
    def destroy(self, instance: InstanceRef) -> None:
        """Stop the domain hard if running and remove its definition."""

    @abc.abstractmethod
    def power_off(self, instance: InstanceRef, timeout: float = 60) -> None:
        """Ask the guest to shut down; force it off after ``timeout`` s (0: at once)."""

    @abc.abstractmethod
    def power_on(self, instance: InstanceRef) -> None:
        """Start a stopped domain (resume a paused one)."""

    @abc.abstractmethod
    def reboot(self, instance: InstanceRef, hard: bool = False) -> None:
        """Reboot; a soft reboot that fails falls back to a hard one."""
