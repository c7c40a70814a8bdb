"""The scheduler's side of the agent's RPC interface (see ``docs/rpc.md``).

One method per RPC method, each aimed at one host, plus :meth:`ComputeAPI.ping_all`,
which pings many hosts at once. A failure on the agent's side is raised
here as the agent's own class from ``compute_agent.exception``
(InstanceNotFound, InvalidInput, InstanceInvalidState or
HypervisorUnavailable) with the agent's message; no reply in time raises
``oslo_messaging.MessagingTimeout``.

Calls block the calling thread (a greenthread, once eventlet has patched
the process), so many may be in flight at once from many threads.

Importing this module loads none of the agent's server side: no
SQLAlchemy, no service, no ``green`` (``tests/unit/test_layers.py``).
oslo.messaging itself still imports eventlet, unpatched, through
oslo.service's default backend.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import oslo_messaging
from oslo_config import cfg

from compute_agent import exception
from compute_agent.rpc import BINARY, PUBLIC_ERRORS, TOPIC, VERSION
from compute_agent.rpc.transport import get_transport

if TYPE_CHECKING:
    from compute_agent.db.api import Database

# Broker connection attempts before a send gives up (oslo's default, None,
# retries for ever, which would make every timeout meaningless).
DEFAULT_RETRY = 2
# Hosts pinged at once by ping_all.
PING_CONCURRENCY = 64


@dataclass(frozen=True)
class HostReply:
    """What one host answered to a fan-out, or why it did not."""

    host: str
    result: Any = None
    error: BaseException | None = None
    elapsed_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None


class ComputeAPI:
    """Client of the agents' RPC interface, version 1.0, topic ``compute``.

    ``conf`` must hold oslo.messaging's ``[DEFAULT]`` options (``transport_url``,
    ``rpc_response_timeout``, ``control_exchange``); ``compute_agent.conf.register_all``
    registers them. Pass ``transport`` to share one between clients (it is then
    not closed by :meth:`close`), and ``db`` to let :meth:`ping_all` find the hosts.
    """

    def __init__(
        self,
        conf: cfg.ConfigOpts,
        *,
        transport: oslo_messaging.Transport | None = None,
        timeout: float | None = None,
        retry: int | None = DEFAULT_RETRY,
        db: Database | None = None,
    ) -> None:
        self.conf = conf
        self._owns_transport = transport is None
        self.transport = transport if transport is not None else get_transport(conf)
        self.timeout: float = timeout if timeout is not None else conf.rpc_response_timeout
        self.db = db
        self._client = oslo_messaging.get_rpc_client(
            self.transport,
            oslo_messaging.Target(topic=TOPIC, version=VERSION),
            timeout=self.timeout,
            retry=retry,
        )

    def close(self) -> None:
        if self._owns_transport:
            self.transport.cleanup()

    def __enter__(self) -> ComputeAPI:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- the plumbing -----------------------------------------------------

    def _prepare(self, host: str, timeout: float | None) -> Any:
        if not isinstance(host, str) or not host:
            raise ValueError(f"host must be a non-empty string, not {host!r}")
        return self._client.prepare(server=host, timeout=timeout or self.timeout)

    def call(self, host: str, method: str, *, timeout: float | None = None, **kwargs: Any) -> Any:
        """Call ``method`` on ``host`` and return its result; raise the agent's error."""
        try:
            return self._prepare(host, timeout).call({}, method, **kwargs)
        except exception.ComputeAgentError as exc:
            raise _local(exc) from None

    def cast(self, host: str, method: str, **kwargs: Any) -> None:
        """Send ``method`` to ``host`` without waiting; its failure is only logged there."""
        self._prepare(host, None).cast({}, method, **kwargs)

    def _call_or_cast(
        self, host: str, method: str, cast: bool, **kwargs: Any
    ) -> dict[str, Any] | None:
        if cast:
            self.cast(host, method, **kwargs)
            return None
        reply: dict[str, Any] = self.call(host, method, **kwargs)
        return reply

    # -- one method per RPC method ----------------------------------------

    def ping(self, host: str, *, timeout: float | None = None) -> dict[str, Any]:
        """``{"host", "version"}`` of the agent on ``host``."""
        reply: dict[str, Any] = self.call(host, "ping", timeout=timeout)
        return reply

    def get_host_state(self, host: str, *, timeout: float | None = None) -> dict[str, Any]:
        reply: dict[str, Any] = self.call(host, "get_host_state", timeout=timeout)
        return reply

    def list_instances(self, host: str, *, timeout: float | None = None) -> list[dict[str, Any]]:
        reply: list[dict[str, Any]] = self.call(host, "list_instances", timeout=timeout)
        return reply

    def get_instance_info(
        self, host: str, instance_uuid: str, *, timeout: float | None = None
    ) -> dict[str, Any]:
        reply: dict[str, Any] = self.call(
            host, "get_instance_info", timeout=timeout, instance_uuid=instance_uuid
        )
        return reply

    def get_instance_stats(
        self, host: str, instance_uuid: str, *, timeout: float | None = None
    ) -> dict[str, Any]:
        reply: dict[str, Any] = self.call(
            host, "get_instance_stats", timeout=timeout, instance_uuid=instance_uuid
        )
        return reply

    def build_instance(
        self, host: str, instance: dict[str, Any], *, cast: bool = False
    ) -> dict[str, Any] | None:
        """Build ``instance`` ({"uuid", "name", "vcpus", "memory_mb"}) on ``host``.

        Called, it returns the instance once built (a build may wait for a
        build slot: give the client a timeout that allows for it).
        """
        return self._call_or_cast(host, "build_instance", cast, instance=instance)

    def start_instance(
        self, host: str, instance_uuid: str, *, cast: bool = False
    ) -> dict[str, Any] | None:
        return self._call_or_cast(host, "start_instance", cast, instance_uuid=instance_uuid)

    def stop_instance(
        self, host: str, instance_uuid: str, *, cast: bool = False
    ) -> dict[str, Any] | None:
        return self._call_or_cast(host, "stop_instance", cast, instance_uuid=instance_uuid)

    def reboot_instance(
        self, host: str, instance_uuid: str, hard: bool = False, *, cast: bool = False
    ) -> dict[str, Any] | None:
        return self._call_or_cast(
            host, "reboot_instance", cast, instance_uuid=instance_uuid, hard=hard
        )

    def delete_instance(
        self, host: str, instance_uuid: str, *, cast: bool = False
    ) -> dict[str, Any] | None:
        return self._call_or_cast(host, "delete_instance", cast, instance_uuid=instance_uuid)

    def sync_power_states(
        self, host: str, instance_uuid: str | None = None, *, timeout: float | None = None
    ) -> dict[str, Any]:
        """Sync ``host`` now (or one of its instances): checked, changed, skipped, errors."""
        kwargs = {} if instance_uuid is None else {"instance_uuid": instance_uuid}
        reply: dict[str, Any] = self.call(host, "sync_power_states", timeout=timeout, **kwargs)
        return reply

    # -- fan-out ----------------------------------------------------------

    def known_hosts(self) -> list[str]:
        """Every host with an agent's service row (stopped or not)."""
        if self.db is None:
            raise ValueError("no hosts given and no database to find them in")
        return sorted({row.host for row in self.db.service_get_all() if row.binary == BINARY})

    def ping_all(
        self,
        hosts: Iterable[str] | None = None,
        *,
        timeout: float | None = None,
        concurrency: int = PING_CONCURRENCY,
    ) -> dict[str, HostReply]:
        """Ping every host at once; one :class:`HostReply` per host, never raising for one.

        oslo.messaging has no fan-out with replies, so this is one call per
        host, ``concurrency`` at a time, each with its own ``timeout``. The
        hosts default to those of the database's service rows.
        """
        pending = sorted(set(self.known_hosts() if hosts is None else hosts))
        replies: dict[str, HostReply] = {}
        lock = threading.Lock()

        def worker() -> None:
            while True:
                with lock:
                    if not pending:
                        return
                    host = pending.pop()
                reply = self._ping_one(host, timeout)
                with lock:
                    replies[host] = reply

        threads = [
            threading.Thread(target=worker, name=f"ping-all-{i}", daemon=True)
            for i in range(max(1, min(concurrency, len(pending))))
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return dict(sorted(replies.items()))

    def _ping_one(self, host: str, timeout: float | None) -> HostReply:
        started = time.monotonic()
        try:
            result = self.ping(host, timeout=timeout)
        except Exception as exc:  # noqa: BLE001 - reported per host
            return HostReply(host, error=exc, elapsed_s=time.monotonic() - started)
        return HostReply(host, result=result, elapsed_s=time.monotonic() - started)


def _local(exc: exception.ComputeAgentError) -> exception.ComputeAgentError:
    """The agent's error as its plain public class, without oslo's remote traceback text.

    oslo rebuilds it as ``<Name>_Remote`` whose str() appends the server's
    traceback; callers want the class and the message.
    """
    for cls in PUBLIC_ERRORS:
        if isinstance(exc, cls):
            try:
                return cls(*exc.args)
            except TypeError:
                return exc
    return exc
