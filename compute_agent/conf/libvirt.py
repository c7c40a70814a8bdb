"""Options of the ``[libvirt]`` group."""

from __future__ import annotations

from oslo_config import cfg

group = cfg.OptGroup("libvirt", title="Libvirt driver options")

opts = [
    cfg.StrOpt(
        "connection_uri",
        default="test:///default",
        help="Libvirt connection URI. The default is libvirt's built-in test "
        "driver, so the agent runs anywhere; a KVM host uses qemu:///system.",
    ),
]


def register(conf: cfg.ConfigOpts) -> None:
    conf.register_group(group)
    conf.register_opts(opts, group=group)
