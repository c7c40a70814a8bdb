"""The compute manager: what this host does for its instances, by delegation.

It owns the driver and the per-instance locks, registers its periodic tasks
with the service, and reacts to the hypervisor connection going and coming:
the service is disabled with an ``AUTO:`` reason while libvirt is away (an
operator's own disable is never touched) and a full sync follows its return.
"""

from __future__ import annotations

import logging
from typing import Any

from oslo_config import cfg

from compute_agent import exception
from compute_agent.db.api import Database
from compute_agent.locks import KeyedLocks
from compute_agent.power_sync import PowerSync, SyncSummary
from compute_agent.service import NodeService
from compute_agent.virt.driver import ComputeDriver
from compute_agent.virt.spec import validate_uuid

LOG = logging.getLogger(__name__)

POWER_SYNC = "power_sync"
AUTO_PREFIX = "AUTO:"


class ComputeManager:
    def __init__(self, conf: cfg.ConfigOpts, db: Database, driver: ComputeDriver) -> None:
        self.conf = conf
        self.db = db
        self.driver = driver
        self.host: str = conf.host
        self.locks = KeyedLocks()
        self.service: NodeService | None = None
        compute = conf.compute
        self.power_sync = PowerSync(
            db,
            driver,
            self.host,
            self.locks,
            concurrency=compute.sync_power_state_concurrency,
            source=compute.power_sync_source,
            action=compute.power_sync_action,
            shutdown_timeout=compute.shutdown_timeout,
            should_stop=self._stopping,
        )

    # -- component life cycle ---------------------------------------------

    def start(self, service: NodeService) -> None:
        self.service = service
        self.driver.add_connection_listener(self._on_connection)
        try:
            self.driver.init_host(self.host)
        except exception.HypervisorUnavailable as exc:
            LOG.error("starting without the hypervisor, retrying in the background: %s", exc)
        else:
            self._set_auto_disabled(False, None)
        service.add_periodic(
            POWER_SYNC, self.power_sync.run, self.conf.compute.sync_power_state_interval
        )

    def stop(self) -> None:
        self.driver.cleanup_host()

    def _stopping(self) -> bool:
        return self.service is not None and self.service.stopping

    # -- hypervisor connection --------------------------------------------

    def _on_connection(self, up: bool, reason: str) -> None:
        if self._stopping():
            return
        if up:
            self._set_auto_disabled(False, None)
            LOG.info("hypervisor back (%s): running a full power sync", reason)
            if self.service is not None and POWER_SYNC in self.service.runner.tasks:
                self.service.runner.run_now(POWER_SYNC)
        else:
            self._set_auto_disabled(True, f"{AUTO_PREFIX} hypervisor connection lost: {reason}")

    def _set_auto_disabled(self, disabled: bool, reason: str | None) -> None:
        if self.service is None or self.service.row is None:
            return
        try:
            changed = self.db.service_set_disabled(
                self.service.row.id, disabled, reason, only_if_reason_prefix=AUTO_PREFIX
            )
        except Exception as exc:  # noqa: BLE001 - the DB may be down too; the next event retries
            LOG.error("could not %s the service: %s", "disable" if disabled else "enable", exc)
            return
        if changed and disabled:
            LOG.warning("service disabled: %s", reason)

    # -- requests ---------------------------------------------------------

    def sync_power_states(
        self, instance_uuid: str | None = None, timeout: float | None = None
    ) -> dict[str, Any]:
        """Sync now, the whole host or one instance, and return the summary.

        A whole-host request joins the periodic task's queue, so concurrent
        requests share one run instead of each starting their own.
        """
        summary: SyncSummary
        if instance_uuid is not None:
            uuid = validate_uuid(instance_uuid, "instance_uuid")
            summary = self.power_sync.sync_one(uuid)
        else:
            assert self.service is not None
            summary = self.service.runner.run_now(POWER_SYNC).result(timeout)
        return summary.as_dict()
