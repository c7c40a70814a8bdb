"""Hosts for the libvirt driver tests: node files of many domains in many states."""

from __future__ import annotations

import uuid as uuidlib
from dataclasses import dataclass

from oslo_config import cfg

from compute_agent.conf import register_all
from compute_agent.states import PowerState
from tests import nodefile

STATE_CYCLE = [
    PowerState.RUNNING,
    PowerState.RUNNING,
    PowerState.PAUSED,
    PowerState.SHUTDOWN,
    PowerState.CRASHED,
    PowerState.SUSPENDED,
]


@dataclass
class Inst:
    """Enough of an instance row for a driver (and for spawn)."""

    uuid: str
    domain_name: str
    vcpus: int = 1
    memory_mb: int = 64


def make_host(path, count: int) -> tuple[str, list[nodefile.TestDomain]]:
    domains = []
    for i in range(count):
        uid = str(uuidlib.UUID(int=i + 1, version=4))
        domains.append(
            nodefile.TestDomain(f"instance-{uid}", uid, STATE_CYCLE[i % len(STATE_CYCLE)])
        )
    return nodefile.write(str(path), domains), domains


def libvirt_conf(uri: str, **overrides) -> cfg.ConfigOpts:
    conf = cfg.ConfigOpts()
    register_all(conf)
    conf([], project="compute-agent")
    conf.set_override("connection_uri", uri, group="libvirt")
    conf.set_override("reconnect_min_delay", 0.05, group="libvirt")
    conf.set_override("reconnect_max_delay", 0.2, group="libvirt")
    for key, value in overrides.items():
        group, _, name = key.rpartition(".")
        conf.set_override(name, value, group=group or None)
    return conf


def kill_connection(driver) -> None:
    """Close a LibvirtDriver's connection behind its back, as a dying daemon would.

    It is closed between calls: closing a connection while another thread
    is inside a call on it crashes libvirt itself, which is why the driver
    never does so either.
    """
    from compute_agent import green

    while driver.host.inflight:
        green.sleep(0)
    green.unproxy(driver.host.conn).close()
