"""The agent's configuration: one oslo.config object, every option registered."""

from __future__ import annotations

from oslo_config import cfg

from compute_agent.conf import compute, database, default, libvirt, messaging, metrics

CONF = cfg.CONF

_MODULES = (default, messaging, compute, libvirt, database, metrics)


def register_all(conf: cfg.ConfigOpts) -> None:
    for module in _MODULES:
        module.register(conf)


register_all(CONF)
