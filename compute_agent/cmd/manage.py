"""``compute-agent-manage``: the operator's command line."""

from compute_agent import green

green.monkey_patch()

import argparse  # noqa: E402
import sys  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402

import sqlalchemy as sa  # noqa: E402
from oslo_config import cfg  # noqa: E402

from compute_agent import log  # noqa: E402
from compute_agent.cmd.common import (  # noqa: E402
    EXIT_FAILED,
    EXIT_OK,
    Fatal,
    ensure_state_path,
    fail,
    load_config,
)
from compute_agent.conf import CONF  # noqa: E402
from compute_agent.db import migration  # noqa: E402
from compute_agent.db.api import Database  # noqa: E402

PROG = "compute-agent-manage"


def _database(conf: cfg.ConfigOpts) -> Database:
    ensure_state_path(conf)
    return Database(conf.database.connection, conf.database.pool_size)


def cmd_db_sync(conf: cfg.ConfigOpts) -> int:
    db = _database(conf)
    before = migration.current_revision(db)
    after = migration.upgrade(db)
    if before == after:
        print(f"database {db.safe_url} already at revision {after}")
    else:
        print(f"database {db.safe_url} migrated from {before or 'empty'} to {after}")
    return EXIT_OK


def cmd_db_version(conf: cfg.ConfigOpts) -> int:
    db = _database(conf)
    current = migration.current_revision(db)
    print(f"current {current or 'none'}, head {migration.head_revision()}")
    return EXIT_OK


def _add_parsers(subparsers: argparse._SubParsersAction) -> None:
    subparsers.required = True
    subparsers.metavar = "COMMAND"
    db = subparsers.add_parser("db", help="database schema")
    db_cmds = db.add_subparsers(dest="action", metavar="ACTION")
    db_cmds.required = True
    db_cmds.add_parser("sync", help="migrate the schema to this version").set_defaults(
        func=cmd_db_sync
    )
    db_cmds.add_parser("version", help="show the schema revision").set_defaults(func=cmd_db_version)


def register_cli(conf: cfg.ConfigOpts) -> None:
    conf.register_cli_opt(cfg.SubCommandOpt("category", title="commands", handler=_add_parsers))


def run(argv: Sequence[str]) -> int:
    register_cli(CONF)
    load_config(CONF, argv, PROG)
    log.setup(CONF)
    func: Callable[[cfg.ConfigOpts], int] = CONF.category.func
    try:
        return func(CONF)
    except sa.exc.SQLAlchemyError as exc:
        raise Fatal(f"database error: {type(exc).__name__}: {str(exc).splitlines()[0]}") from None


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return run(sys.argv[1:] if argv is None else argv)
    except Fatal as exc:
        return fail(PROG, str(exc), exc.status)
    except KeyboardInterrupt:
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
