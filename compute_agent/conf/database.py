"""Options of the ``[database]`` group."""

from __future__ import annotations

from oslo_config import cfg

from compute_agent.conf.groups import register_group

group = cfg.OptGroup("database", title="Database options")

opts = [
    cfg.StrOpt(
        "connection",
        default="sqlite:///$state_path/compute-agent.sqlite",
        secret=True,
        help="SQLAlchemy URL of the database. postgresql:// URLs use the pg8000 "
        "driver and mysql:// URLs use PyMySQL unless a driver is named, because "
        "both are pure Python and so cooperate with the agent's green threads.",
    ),
    cfg.IntOpt(
        "pool_size",
        default=5,
        min=1,
        help="Connections kept open to a server database.",
    ),
]


def register(conf: cfg.ConfigOpts) -> None:
    register_group(conf, group, opts)
