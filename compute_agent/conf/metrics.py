"""Options of the ``[metrics]`` group: the Prometheus endpoint."""

from __future__ import annotations

from oslo_config import cfg

from compute_agent.conf.groups import register_group

group = cfg.OptGroup("metrics", title="Prometheus metrics endpoint")

opts = [
    cfg.HostAddressOpt(
        "listen_address",
        default="127.0.0.1",
        help="Address the /metrics endpoint listens on. It has no authentication: "
        "keep it on the loopback or a management network.",
    ),
    cfg.PortOpt(
        "listen_port",
        default=9179,
        help="TCP port of the /metrics endpoint (Prometheus text format); 0 turns it "
        "off. A port already taken stops the agent at start (exit status 2).",
    ),
]


def register(conf: cfg.ConfigOpts) -> None:
    register_group(conf, group, opts)
