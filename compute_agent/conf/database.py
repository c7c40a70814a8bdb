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
    # Deadlines: a database that stops answering must fail a call, not hang it
    # (the heartbeat, status and the CLI would hang with it).
    cfg.FloatOpt(
        "connect_timeout",
        default=5.0,
        min=0.1,
        help="Seconds to open a connection to a server database, handshake and "
        "login included, before the attempt fails as DatabaseUnavailable. "
        "libpq's and PyMySQL's name for the same deadline.",
    ),
    cfg.FloatOpt(
        "statement_timeout",
        default=30.0,
        min=0.1,
        help="Seconds a statement may wait for a server database's answer. "
        "The client gives up on a silent connection after this long "
        "(DatabaseUnavailable), and PostgreSQL also cancels a statement that "
        "runs longer (its own statement_timeout).",
    ),
    cfg.FloatOpt(
        "sqlite_busy_timeout",
        default=5.0,
        min=0.0,
        help="Seconds a SQLite statement waits for a lock held by another "
        "process (the admin CLI) before it fails with 'database is locked'.",
    ),
]


def register(conf: cfg.ConfigOpts) -> None:
    register_group(conf, group, opts)
