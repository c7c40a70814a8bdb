"""Entry point for oslo-config-generator (``compute_agent.conf.opts:list_opts``)."""

from __future__ import annotations

from oslo_config import cfg

from compute_agent.conf import compute, database, default, libvirt, messaging, metrics


def list_opts() -> list[tuple[str, list[cfg.Opt]]]:
    return [
        ("DEFAULT", default.opts + messaging.opts),
        (compute.group.name, compute.opts),
        (libvirt.group.name, libvirt.opts),
        (database.group.name, database.opts),
        (metrics.group.name, metrics.opts),
    ]
