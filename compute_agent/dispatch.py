"""The one table of requests the agent answers, shared by RPC and the admin socket.

Both front doors hand a method name and a dict of keyword arguments to
:meth:`Dispatcher.call`. It checks the shape of the request (a known
method, an object of arguments, no missing or unknown argument, a bounded
size) and the manager checks the values; every failure is a typed error
from ``compute_agent.exception`` with a message that says what was wrong.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from compute_agent import __version__, concurrency, exception, green, servicegroup
from compute_agent.intake import IntakeGate
from compute_agent.metrics import registry
from compute_agent.rpc import BINARY
from compute_agent.states import ActionSource, PowerState
from compute_agent.utils import printable, request_args

if TYPE_CHECKING:
    from compute_agent.manager import ComputeManager
    from compute_agent.service import NodeService

# A request's arguments, serialized, may not exceed this.
MAX_ARGS_BYTES = 64 * 1024
# Requests that do work run at most this many at once without a config.
DEFAULT_SLOTS = 64
SYNC_FIELDS = ("checked", "changed", "skipped", "errors", "duration_s")


@dataclass(frozen=True)
class Method:
    fn: Callable[..., Any]
    required: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()
    admin_only: bool = False  # not offered over RPC
    gated: bool = False  # does work: waits for a slot of the intake gate


def _slots(service: Any) -> int:
    conf = getattr(service, "conf", None)
    return int(getattr(conf, "max_concurrent_requests", DEFAULT_SLOTS))


class Dispatcher:
    """The request table; requests that do work pass ``intake`` (RPC and CLI alike).

    Without an ``intake`` gate, one is made with ``[DEFAULT]
    max_concurrent_requests`` slots from the service's config.
    """

    def __init__(
        self, manager: ComputeManager, service: NodeService, intake: IntakeGate | None = None
    ) -> None:
        self.manager = manager
        self.service = service
        self.intake = intake if intake is not None else IntakeGate(_slots(service))
        self.methods: dict[str, Method] = {
            "ping": Method(self.ping),
            "get_host_state": Method(self.get_host_state),
            "list_instances": Method(self.list_instances, gated=True),
            "get_instance_info": Method(self.get_instance_info, ("instance_uuid",)),
            "get_instance_stats": Method(self.get_instance_stats, ("instance_uuid",)),
            "build_instance": Method(self.build_instance, ("instance",), gated=True),
            "start_instance": Method(self.start_instance, ("instance_uuid",), gated=True),
            "stop_instance": Method(self.stop_instance, ("instance_uuid",), gated=True),
            "reboot_instance": Method(
                self.reboot_instance, ("instance_uuid",), ("hard",), gated=True
            ),
            "delete_instance": Method(self.delete_instance, ("instance_uuid",), gated=True),
            "sync_power_states": Method(self.sync_power_states, (), ("instance_uuid",), gated=True),
            "reap_deleted_instances": Method(
                self.reap_deleted_instances, admin_only=True, gated=True
            ),
            "status": Method(self.status, admin_only=True),
            "get_instance_actions": Method(
                self.get_instance_actions, ("instance_uuid",), ("limit",), admin_only=True
            ),
            "set_service_disabled": Method(
                self.set_service_disabled, ("disabled",), ("reason",), admin_only=True
            ),
        }

    def public(self, admin: bool) -> list[str]:
        return sorted(n for n, m in self.methods.items() if admin or not m.admin_only)

    def call(self, method: Any, args: Any, source: ActionSource, *, admin: bool = False) -> Any:
        """Check the request's shape, then run it; raise typed errors only.

        Each request is counted by front door, method and outcome; a method
        name not in the table counts as ``unknown`` (the caller chooses it).
        """
        front = "rpc" if source is ActionSource.RPC else "admin"
        name = method if isinstance(method, str) and method in self.methods else "unknown"
        started = green.monotonic()
        outcome = "ok"
        try:
            return self._call(method, args, source, admin)
        except BaseException as exc:
            outcome = type(exc).__name__
            raise
        finally:
            registry.REQUESTS.inc((front, name, outcome))
            registry.REQUEST_DURATION.observe((front, name), green.monotonic() - started)

    def _call(self, method: Any, args: Any, source: ActionSource, admin: bool) -> Any:
        spec = self.methods.get(method) if isinstance(method, str) else None
        if spec is None or (spec.admin_only and not admin):
            raise exception.InvalidInput(
                f"unknown method {str(method)[:80]!r}; known: {', '.join(self.public(admin))}"
            )
        args = request_args(method, args)
        try:
            size = len(json.dumps(args, default=str))
        except (TypeError, ValueError, RecursionError) as exc:
            raise exception.InvalidInput(f"{method}: arguments cannot be read: {exc}") from None
        if size > MAX_ARGS_BYTES:
            raise exception.InvalidInput(
                f"{method}: arguments of {size} bytes exceed the limit of {MAX_ARGS_BYTES}"
            )
        missing = [a for a in spec.required if a not in args]
        if missing:
            raise exception.InvalidInput(f"{method}: missing argument(s) {', '.join(missing)}")
        unknown = sorted(printable(a, 40) for a in args if a not in spec.required + spec.optional)
        if unknown:
            raise exception.InvalidInput(
                f"{method}: unknown argument(s) {', '.join(unknown[:5])}; takes "
                f"{', '.join(spec.required + spec.optional) or 'none'}"
            )
        if not spec.gated:
            return spec.fn(source=source, **args)
        with self.intake.admit():
            return spec.fn(source=source, **args)

    # -- the methods ------------------------------------------------------

    def ping(self, source: ActionSource) -> dict[str, Any]:
        return {"host": self.manager.host, "version": __version__}

    def get_host_state(self, source: ActionSource) -> dict[str, Any]:
        counts = self.manager.db.instance_counts(self.manager.host)
        row = self.manager.db.service_get(self.manager.host, BINARY)
        down_time = self.service.conf.service_down_time
        return {
            "host": self.manager.host,
            "service": servicegroup.describe(row, down_time) if row else None,
            "libvirt_connected": self.manager.driver.connected,
            "instances": counts.instances,
            "instances_by_power_state": {
                p.value: counts.by_power_state.get(p.value, 0) for p in PowerState
            },
            "vcpus_used": counts.vcpus,
            "memory_mb_used": counts.memory_mb,
        }

    def _host_state_or_error(self, source: ActionSource) -> dict[str, Any]:
        """The host's state, or why it cannot be read: status must answer in an outage."""
        try:
            return self.get_host_state(source)
        except exception.DatabaseUnavailable as exc:
            return {"host": self.manager.host, "error": str(exc)}

    def list_instances(self, source: ActionSource) -> list[dict[str, Any]]:
        return self.manager.list_instances()

    def get_instance_info(self, source: ActionSource, instance_uuid: Any) -> dict[str, Any]:
        return self.manager.get_instance_info(instance_uuid)

    def get_instance_actions(
        self, source: ActionSource, instance_uuid: Any, limit: Any = 100
    ) -> list[dict[str, Any]]:
        return self.manager.get_instance_actions(instance_uuid, limit)

    def set_service_disabled(
        self, source: ActionSource, disabled: Any, reason: Any = None
    ) -> dict[str, Any]:
        return self.manager.set_service_disabled(disabled, reason)

    def get_instance_stats(self, source: ActionSource, instance_uuid: Any) -> dict[str, Any]:
        return self.manager.get_instance_stats(instance_uuid)

    def build_instance(self, source: ActionSource, instance: Any) -> dict[str, Any]:
        return self.manager.build_instance(instance, source)

    def start_instance(self, source: ActionSource, instance_uuid: Any) -> dict[str, Any]:
        return self.manager.start_instance(instance_uuid, source)

    def stop_instance(self, source: ActionSource, instance_uuid: Any) -> dict[str, Any]:
        return self.manager.stop_instance(instance_uuid, source)

    def reboot_instance(
        self, source: ActionSource, instance_uuid: Any, hard: Any = False
    ) -> dict[str, Any]:
        return self.manager.reboot_instance(instance_uuid, hard, source)

    def delete_instance(self, source: ActionSource, instance_uuid: Any) -> dict[str, Any]:
        return self.manager.delete_instance(instance_uuid, source)

    def sync_power_states(self, source: ActionSource, instance_uuid: Any = None) -> dict[str, Any]:
        summary = self.manager.sync_power_states(instance_uuid)
        if source is ActionSource.RPC:
            return {k: summary[k] for k in SYNC_FIELDS}
        return summary

    def reap_deleted_instances(self, source: ActionSource) -> dict[str, Any]:
        return self.manager.reap_deleted()

    def status(self, source: ActionSource) -> dict[str, Any]:
        """Everything an operator asks first: service, libvirt, tasks, hub lag.

        Read from the components' ``statistics()`` only.
        """
        agent, service = self.manager.statistics(), self.service.statistics()
        driver, sync = agent.driver, agent.power_sync
        return {
            "host": self.manager.host,
            "version": __version__,
            "concurrency": {
                "backend": green.BACKEND,
                "source": concurrency.chosen().source,
                "loaded": concurrency.loaded_modules(),
                # How soon a thread waiting for the GIL asks for it (threads: 1 ms).
                "switch_interval_s": sys.getswitchinterval(),
            },
            "host_state": self._host_state_or_error(source),
            "libvirt": {
                "connected": agent.connected,
                "uri": driver.uri if driver is not None else None,
                "last_error": driver.last_error if driver is not None else None,
                "connections": (
                    asdict(driver.connections)
                    if driver is not None and driver.connections is not None
                    else None
                ),
            },
            "periodic_tasks": [asdict(t) for t in service.tasks],
            "hub_lag": asdict(service.hub_lag),
            "events": asdict(agent.events) if agent.events is not None else None,
            "builds": asdict(agent.builds),
            "resume": asdict(agent.resume),
            "intake": asdict(self.intake.statistics()),
            "power_sync_progress": list(sync.progress),
            "running_deleted": asdict(agent.reaper),
            "db_purge": asdict(agent.retention),
            "unresponsive_instances": list(agent.stats.unresponsive),
            # The last full power sync's domains that belong to no instance of this host.
            "unknown_domains": {
                "count": sync.unknown_domains,
                "names": list(sync.unknown_names),
                "checked_at": sync.unknown_checked_at,
            },
        }
