"""Choose the virt driver named by ``[DEFAULT] compute_driver``."""

from __future__ import annotations

from oslo_config import cfg

from compute_agent.virt.driver import ComputeDriver


def load_driver(conf: cfg.ConfigOpts) -> ComputeDriver:
    if conf.compute_driver == "fake":
        from compute_agent.virt.fake import FakeDriver

        return FakeDriver()
    from compute_agent.virt.libvirt.driver import LibvirtDriver

    return LibvirtDriver(conf)
