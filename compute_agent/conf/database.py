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
        default=3,
        min=1,
        help="Connections to a server database this agent may hold at once. "
        "One stays open between uses, so an idle agent holds one; under load "
        "(a full sync, a build storm, a purge) up to pool_size are open, the "
        "extra ones closed as soon as they are given back, and further callers "
        "wait for a free one. The agent's transactions are short (milliseconds), "
        "so 3 lets the heartbeat through while two other tasks write. Size the "
        "server (or PgBouncer's max_client_conn) for hosts x pool_size at peak "
        "and hosts x 1 when idle (docs/operations.md).",
    ),
    cfg.BoolOpt(
        "transaction_pooling",
        default=False,
        help="Set when [database] connection points at a PgBouncer in transaction "
        "pooling mode (pool_mode = transaction), the usual front of a PostgreSQL "
        "shared by hundreds of hosts. PostgreSQL's statement_timeout is then set "
        "with SET LOCAL at the start of each transaction (one more statement "
        "each) instead of as a connection startup parameter, which PgBouncer "
        "refuses and which would not follow the agent from one server connection "
        "to the next. PostgreSQL only.",
    ),
    cfg.FloatOpt(
        "busy_start_timeout",
        default=90.0,
        min=0.0,
        help="Seconds the agent keeps retrying at start, with backoff and one log "
        "line per try, while the database refuses it for load (PostgreSQL 'too "
        "many clients', MariaDB 'Too many connections', PgBouncer's "
        "max_client_conn, a server starting up) before it gives up and exits. "
        "Keep it below the unit's TimeoutStartSec (120 s in "
        "etc/compute-agent.service). Any other database error at start is fatal "
        "at once. 0 retries nothing.",
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
    # Retention: nothing is ever removed unless asked for.
    cfg.IntOpt(
        "purge_deleted_after_days",
        default=0,
        min=0,
        help="Days after which the agent removes a soft-deleted instance of this host "
        "and its whole audit trail (instance_actions), in small batches in the "
        "background; 0 (the default) keeps them forever. nova operators usually "
        "purge from cron what was deleted 30 to 90 days ago (compute-agent-manage "
        "db purge --older-than DAYS does it by hand, with an archive).",
    ),
    cfg.IntOpt(
        "purge_actions_after_days",
        default=0,
        min=0,
        help="Days after which the agent removes audit rows (instance_actions) of "
        "this host's live instances; 0 (the default) keeps them. A long-lived "
        "instance's trail then keeps its recent history only. Operators who keep "
        "a trail for audits usually choose 90 days or more, or leave it at 0.",
    ),
]


def register(conf: cfg.ConfigOpts) -> None:
    register_group(conf, group, opts)
