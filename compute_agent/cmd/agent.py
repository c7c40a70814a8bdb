"""``compute-agent``: the node service."""

import signal
import sys

# Until install_signal_handlers: a Ctrl-C during the imports ends the
# process as SIGTERM would, not with a KeyboardInterrupt traceback.
signal.signal(signal.SIGINT, signal.SIG_DFL)

from compute_agent import concurrency  # noqa: E402

# Before green (and oslo.messaging) load: they run on the backend chosen here.
concurrency.select_or_exit(sys.argv[1:], "compute-agent")

from compute_agent import green  # noqa: E402

green.monkey_patch()

import logging  # noqa: E402
import os  # noqa: E402
from collections.abc import Sequence  # noqa: E402

import sqlalchemy as sa  # noqa: E402
from oslo_config import cfg  # noqa: E402

from compute_agent import exception, log, sdnotify  # noqa: E402
from compute_agent.admin.server import AdminSocketServer  # noqa: E402
from compute_agent.cmd.common import (  # noqa: E402
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    ensure_state_path,
    fail,
    load_config,
)
from compute_agent.conf import CONF, loader  # noqa: E402
from compute_agent.db import migration  # noqa: E402
from compute_agent.db.api import Database  # noqa: E402
from compute_agent.db.busy import BusyWaiter  # noqa: E402
from compute_agent.db.engine import Deadlines  # noqa: E402
from compute_agent.dispatch import Dispatcher  # noqa: E402
from compute_agent.exception import (  # noqa: E402
    AdminSocketError,
    Fatal,
    MetricsBindError,
    OwnedElsewhere,
    SchemaError,
)
from compute_agent.manager import ComputeManager  # noqa: E402
from compute_agent.metrics.collector import AgentCollector  # noqa: E402
from compute_agent.metrics.server import MetricsServer  # noqa: E402
from compute_agent.ownership import HostLock, new_token  # noqa: E402
from compute_agent.rpc.server import RPCServer  # noqa: E402
from compute_agent.rpc.transport import check_transport_url  # noqa: E402
from compute_agent.service import NodeService  # noqa: E402
from compute_agent.virt.loader import load_driver  # noqa: E402

LOG = logging.getLogger("compute_agent.agent")
PROG = "compute-agent"


def build_service(
    conf: cfg.ConfigOpts,
    *,
    owner: str | None = None,
    predecessor: tuple[str, ...] = (),
    busy: BusyWaiter | None = None,
) -> tuple[NodeService, AdminSocketServer, MetricsServer | None]:
    """The service and its parts; ``busy`` waits out a database refusing for load."""
    busy = busy or BusyWaiter(0.0)
    try:
        check_transport_url(conf)
    except ValueError as exc:
        raise Fatal(str(exc), EXIT_USAGE) from None
    try:
        db = Database(
            conf.database.connection,
            conf.database.pool_size,
            Deadlines.from_conf(conf.database),
            transaction_pooling=conf.database.transaction_pooling,
        )
    except (exception.InvalidInput, sa.exc.ArgumentError, ImportError) as exc:
        # An unparseable URL, an unknown dialect or a driver not installed.
        raise Fatal(f"[database] connection is not usable: {exc}", EXIT_USAGE) from None
    try:
        busy.call("checking the database schema", lambda: migration.check_schema(db))
    except SchemaError as exc:
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
    service = NodeService(conf, db, components=[manager], owner=owner, predecessor=predecessor)
    dispatcher = Dispatcher(manager, service)
    service.components.append(RPCServer(conf, dispatcher))
    admin = AdminSocketServer(conf.admin_socket, dispatcher, grace=conf.graceful_shutdown_timeout)
    service.components.append(admin)
    metrics = None
    if conf.metrics.listen_port:
        metrics = MetricsServer(
            conf.metrics.listen_address, conf.metrics.listen_port, AgentCollector(service, manager)
        )
        service.components.append(metrics)
    return service, admin, metrics


def take_host_lock(conf: cfg.ConfigOpts) -> HostLock:
    """Lock the state directory for this process's life, or stop with one line naming the holder."""
    lock = HostLock(conf.state_path)
    try:
        lock.acquire()
    except OwnedElsewhere as exc:
        raise Fatal(str(exc)) from None
    except OSError as exc:
        raise Fatal(f"cannot lock {lock.path}: {exc.strerror}") from None
    return lock


def claim_host(
    service: NodeService,
    admin: AdminSocketServer,
    metrics: MetricsServer | None,
    busy: BusyWaiter | None = None,
) -> None:
    """Claim the service row, then bind the admin socket and the metrics port.

    Nothing else is touched before; a socket that cannot be bound gives the
    row back. ``busy`` waits out a database refusing for load.
    """
    busy = busy or BusyWaiter(0.0)
    try:
        busy.call("claiming the service row", service.claim)
    except exception.ServiceOwned as exc:
        raise Fatal(str(exc)) from None
    except exception.DatabaseUnavailable as exc:
        raise Fatal(f"cannot claim the service row: {exc}") from None
    try:
        admin.listen()
    except AdminSocketError as exc:
        service.release_claim()
        raise Fatal(str(exc)) from None
    if metrics is not None:
        try:
            metrics.listen()  # a taken port is a configuration error, found before start
        except MetricsBindError as exc:
            admin.release()
            service.release_claim()
            raise Fatal(str(exc), EXIT_USAGE) from None


def install_signal_handlers(service: NodeService, conf: cfg.ConfigOpts) -> None:
    """SIGTERM and SIGINT stop the agent, SIGHUP reopens the log and reloads options.

    The handler only hands the signal to a new greenthread: Python runs it
    between two bytecodes of whatever the main thread was doing, possibly
    inside the logging queue's lock, so it logs and acts from there instead.
    """

    def handle(signum: int) -> None:
        name = signal.Signals(signum).name
        if signum == signal.SIGHUP:
            reload(conf)
        else:
            service.request_stop(name)

    def on_signal(signum: int, _frame: object) -> None:
        green.spawn(handle, signum, name=f"signal-{signum}")

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)


def hup_reopens_log_while_starting() -> None:
    """Until the service is built, SIGHUP only reopens the log.

    Its default action ends the process: a logrotate ``kill -HUP`` while the
    database or libvirt were slow to answer at start killed the agent, with
    no line logged. install_signal_handlers replaces this handler.
    """

    def on_hup(_signum: int, _frame: object) -> None:
        green.spawn(log.reopen, name="signal-1")

    signal.signal(signal.SIGHUP, on_hup)


def reload(conf: cfg.ConfigOpts) -> None:
    """SIGHUP: reopen the log file, re-read the config files, apply the mutable options."""
    LOG.info("SIGHUP received: reopening the log file and reloading the mutable options")
    log.reopen()
    try:
        loader.mutate(conf)  # logs each mutable option that changed
    except Exception as exc:  # noqa: BLE001 - a bad edit must not kill a running agent
        LOG.error("config reload failed, keeping the options in force: %s", exc)
        return
    log.set_level(conf.debug)
    LOG.info("reload done: log level %s", "DEBUG" if conf.debug else "INFO")


def run(argv: Sequence[str]) -> int:
    load_config(CONF, argv, PROG)
    try:
        concurrency.check_configured(CONF.concurrency_backend)
    except concurrency.BackendChoiceError as exc:
        raise Fatal(str(exc), EXIT_USAGE) from None
    try:
        log.setup(CONF, background=True)
    except OSError as exc:
        raise Fatal(f"cannot open the log: {exc}") from None
    green.wake_on_signals()  # a signal's task runs at once, not at the hub's next timer
    hup_reopens_log_while_starting()
    if CONF.debug:
        # Every option's value, as OpenStack services log them; oslo.config
        # prints secret options ([database] connection, transport_url) as ****.
        CONF.log_opt_values(LOG, logging.DEBUG)
    for name in loader.unknown_options(CONF):
        LOG.warning("ignoring unknown option %s in the config files", name)
    for doubt in loader.doubtful_settings(CONF):
        LOG.warning("%s", doubt)
    ensure_state_path(CONF)
    notifier = sdnotify.Notifier()
    try:
        return serve(notifier)
    except Fatal as exc:
        notifier.status(f"refused to start: {exc}")
        raise
    finally:
        notifier.close()


def serve(notifier: sdnotify.Notifier) -> int:
    # First of all: a second agent for this state_path stops here.
    lock = take_host_lock(CONF)
    owner = new_token()
    predecessor = lock.previous.tokens
    lock.record(owner, predecessor)  # kept until the claim: we may die before it
    green.set_native_threads(CONF.native_thread_pool_size)
    green.exit_without_joining_native_threads()
    # One deadline for the whole start: a database refusing for load (too
    # many clients) is retried until then, not fatal at the first refusal.
    busy = BusyWaiter(CONF.database.busy_start_timeout, status=notifier.status)
    service, admin, metrics = build_service(CONF, owner=owner, predecessor=predecessor, busy=busy)
    install_signal_handlers(service, CONF)
    loop = sdnotify.NotifyLoop(notifier, service.status, CONF.report_interval)
    # A stop request ends either step's wait at once (a locked row, a hung
    # libvirtd); refused (Fatal): one line, nothing written, nothing to stop.
    # The claim is not cancelled: it undoes itself if it gets to commit after
    # the request, and the stop waits for a commit already under way.
    claimed = service.run_start_step(
        "claiming the service row",
        lambda: claim_host(service, admin, metrics, busy),
        cancel=False,
    )
    try:
        if claimed:
            lock.record(owner)  # the row is ours: the tokens before are of no use now
        if claimed and service.run_start_step("starting", service.start):
            notifier.ready(service.status())
            loop.start()
            service.wait()
    finally:
        notifier.stopping(service.status())
        service.stop()
        loop.stop()
        lock.release()
    return service.exit_status or EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Run the agent, write out the log, then leave the process with its exit status.

    Once the agent has stopped in order, nothing is left to wait for; the
    interpreter's exit (thread joins, logging's shutdown waiting on handler
    locks without bound) only gives a stopped agent more ways to hang.
    """
    status = _main(argv)
    log.close()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _main(argv: Sequence[str] | None) -> int:
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
