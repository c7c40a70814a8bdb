"""``compute-agent``: the node service."""

from compute_agent import green

green.monkey_patch()

import logging  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
from collections.abc import Sequence  # noqa: E402

import sqlalchemy as sa  # noqa: E402

from compute_agent import exception, log  # noqa: E402
from compute_agent.admin.server import AdminSocketServer  # noqa: E402
from compute_agent.cmd.common import (  # noqa: E402
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    Fatal,
    ensure_state_path,
    fail,
    load_config,
)
from compute_agent.conf import CONF, loader  # noqa: E402
from compute_agent.db import migration  # noqa: E402
from compute_agent.db.api import Database  # noqa: E402
from compute_agent.db.engine import Deadlines  # noqa: E402
from compute_agent.dispatch import Dispatcher  # noqa: E402
from compute_agent.manager import ComputeManager  # noqa: E402
from compute_agent.metrics.collector import AgentCollector  # noqa: E402
from compute_agent.metrics.server import MetricsBindError, MetricsServer  # noqa: E402
from compute_agent.rpc.server import RPCServer  # noqa: E402
from compute_agent.rpc.transport import check_transport_url  # noqa: E402
from compute_agent.service import NodeService  # noqa: E402
from compute_agent.virt.loader import load_driver  # noqa: E402

LOG = logging.getLogger("compute_agent.agent")
PROG = "compute-agent"


def build_service(conf) -> NodeService:
    try:
        check_transport_url(conf)
    except ValueError as exc:
        raise Fatal(str(exc), EXIT_USAGE) from None
    try:
        db = Database(
            conf.database.connection, conf.database.pool_size, Deadlines.from_conf(conf.database)
        )
    except (exception.InvalidInput, sa.exc.ArgumentError, ImportError) as exc:
        # An unparseable URL, an unknown dialect or a driver not installed.
        raise Fatal(f"[database] connection is not usable: {exc}", EXIT_USAGE) from None
    try:
        migration.check_schema(db)
    except migration.SchemaError as exc:
        raise Fatal(str(exc)) from None
    except exception.DatabaseUnavailable as exc:
        # Down, refusing, or silent past [database] connect_timeout.
        raise Fatal(f"cannot use database {db.safe_url}: {exc}") from None
    except sa.exc.SQLAlchemyError as exc:
        raise Fatal(
            f"cannot use database {db.safe_url}: {exc.__class__.__name__}: "
            f"{str(exc).splitlines()[0]}"
        ) from None
    manager = ComputeManager(conf, db, load_driver(conf))
    service = NodeService(conf, db, components=[manager])
    dispatcher = Dispatcher(manager, service)
    service.components.append(RPCServer(conf, dispatcher))
    admin = AdminSocketServer(conf.admin_socket, dispatcher, grace=conf.graceful_shutdown_timeout)
    admin.listen()  # now: a second agent on this host must stop before it touches anything
    service.components.append(admin)
    if conf.metrics.listen_port:
        metrics = MetricsServer(
            conf.metrics.listen_address, conf.metrics.listen_port, AgentCollector(service, manager)
        )
        try:
            metrics.listen()  # a taken port is a configuration error, found before start
        except MetricsBindError as exc:
            admin.release()
            raise Fatal(str(exc), EXIT_USAGE) from None
        service.components.append(metrics)
    return service


def run(argv: Sequence[str]) -> int:
    load_config(CONF, argv, PROG)
    log.setup(CONF, background=True)
    if CONF.debug:
        # Every option's value, as OpenStack services log them; oslo.config
        # prints secret options ([database] connection, transport_url) as ****.
        CONF.log_opt_values(LOG, logging.DEBUG)
    for name in loader.unknown_options(CONF):
        LOG.warning("ignoring unknown option %s in the config files", name)
    for doubt in loader.doubtful_settings(CONF):
        LOG.warning("%s", doubt)
    ensure_state_path(CONF)
    green.set_native_threads(CONF.native_thread_pool_size)
    green.exit_without_joining_native_threads()
    service = build_service(CONF)

    def on_signal(signum: int, _frame: object) -> None:
        service.request_stop(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        service.start()
        service.wait()
    finally:
        service.stop()
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return run(sys.argv[1:] if argv is None else argv)
    except Fatal as exc:
        return fail(PROG, str(exc), exc.status)
    except KeyboardInterrupt:
        return EXIT_OK
    except Exception as exc:
        LOG.exception("compute-agent failed")
        return fail(PROG, f"{type(exc).__name__}: {exc}", EXIT_FAILED)


if __name__ == "__main__":
    sys.exit(main())
