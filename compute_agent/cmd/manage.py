"""``compute-agent-manage``: the operator's command line.

``db`` commands open the database themselves; every other command asks the
running agent through its admin socket (``[DEFAULT] admin_socket``), so it
sees the agent's own state (its tasks, its libvirt connection) and goes
through the same checks and per-instance locks as RPC.

Exit status: 0 success; 1 the operation failed (the agent's typed error,
an aborted sync, a database error); 2 a usage error (bad arguments, or the
agent's ``InvalidInput``, which says the same thing); 3 no agent answers
on the socket, or not within the command's deadline (``--timeout``): no
command hangs. Every failure is one line on stderr.
"""

import os
import sys

from compute_agent import concurrency

# Before green (and oslo.messaging) load: they run on the backend chosen here.
concurrency.select_or_exit(sys.argv[1:], "compute-agent-manage")

# A short-lived, single-threaded CLI needs no green DNS, and importing it
# (dnspython) is a third of the CLI's start-up time. Only eventlet's import
# reads the variable; it is put back so that nothing this process starts
# inherits it.
_GREENDNS = os.environ.get("EVENTLET_NO_GREENDNS")
os.environ["EVENTLET_NO_GREENDNS"] = "yes"
try:
    from compute_agent import green
finally:
    if _GREENDNS is None:
        del os.environ["EVENTLET_NO_GREENDNS"]
    else:
        os.environ["EVENTLET_NO_GREENDNS"] = _GREENDNS

green.monkey_patch()

import argparse  # noqa: E402
import contextlib  # noqa: E402
import datetime as dt  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import re  # noqa: E402
import uuid as uuidlib  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from typing import Any, TextIO  # noqa: E402

from oslo_config import cfg  # noqa: E402

from compute_agent import exception, log  # noqa: E402
from compute_agent.admin.client import (  # noqa: E402
    DEFAULT_TIMEOUT,
    MAX_TOTAL,
    AdminClient,
)
from compute_agent.cmd import output  # noqa: E402
from compute_agent.cmd.common import (  # noqa: E402
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    ensure_state_path,
    fail,
    load_config,
)
from compute_agent.conf import CONF  # noqa: E402
from compute_agent.exception import (  # noqa: E402
    AgentUnreachable,
    ClientError,
    ColumnError,
    Fatal,
    RemoteError,
)
from compute_agent.states import PowerState, VmState  # noqa: E402
from compute_agent.utils import is_uuid  # noqa: E402

PROG = "compute-agent-manage"
EXIT_NO_AGENT = 3
# Calls that may wait for a guest (a graceful stop) or a build: a longer default.
OPERATIONS = frozenset(
    {
        "build_instance",
        "start_instance",
        "stop_instance",
        "reboot_instance",
        "delete_instance",
        "reap_deleted_instances",
    }
)
OPERATION_MARGIN = 30.0

INSTANCE_COLUMNS = (
    "uuid",
    "name",
    "vm_state",
    "task_state",
    "power_state",
    "vcpus",
    "memory_mb",
    "updated_at",
)
ACTION_COLUMNS = (
    "created_at",
    "action",
    "field",
    "old_value",
    "new_value",
    "source",
    "reason",
)
SERVICE_COLUMNS = ("host", "binary", "up", "disabled", "disabled_reason", "last_heartbeat")
TASK_COLUMNS = (
    "name",
    "interval",
    "running",
    "last_start",
    "last_duration_s",
    "next_run_in_s",
    "runs",
    "failures",
    "last_error",
)
# status as a person reads it: (field, path into the agent's status object).
STATUS_FIELDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("host", ("host",)),
    ("version", ("version",)),
    ("concurrency_backend", ("concurrency", "backend")),
    ("concurrency_source", ("concurrency", "source")),
    ("service_up", ("host_state", "service", "up")),
    ("service_disabled", ("host_state", "service", "disabled")),
    ("disabled_reason", ("host_state", "service", "disabled_reason")),
    ("last_heartbeat", ("host_state", "service", "last_heartbeat")),
    ("heartbeat_age_s", ("host_state", "service", "heartbeat_age_s")),
    ("libvirt_connected", ("libvirt", "connected")),
    ("libvirt_uri", ("libvirt", "uri")),
    ("libvirt_last_error", ("libvirt", "last_error")),
    # The connections carrying calls, one each: open, busy, stuck (set aside), ...
    ("libvirt_connections", ("libvirt", "connections")),
    ("instances", ("host_state", "instances")),
    ("instances_by_power_state", ("host_state", "instances_by_power_state")),
    ("vcpus_used", ("host_state", "vcpus_used")),
    ("memory_mb_used", ("host_state", "memory_mb_used")),
    ("hub_lag_last_s", ("hub_lag", "last_s")),
    ("hub_lag_p50_s", ("hub_lag", "p50_s")),
    ("hub_lag_p99_s", ("hub_lag", "p99_s")),
    ("hub_lag_max_s", ("hub_lag", "max_s")),
    ("hub_lag_warnings", ("hub_lag", "warnings")),
    ("hub_lag_worst_offender", ("hub_lag", "worst_offender")),
    ("events", ("events",)),
    ("builds", ("builds",)),
    ("resume", ("resume",)),
    ("power_sync_progress", ("power_sync_progress",)),
    ("running_deleted", ("running_deleted",)),
    ("db_purge", ("db_purge",)),
    ("unresponsive_instances", ("unresponsive_instances",)),
    # Domains on the hypervisor that belong to no instance (the last power sync's).
    ("unknown_domains", ("unknown_domains", "count")),
    ("unknown_domain_names", ("unknown_domains", "names")),
    ("admin_socket", ("admin_socket",)),
    # Set when the host's state cannot be read (its database is down).
    ("host_state_error", ("host_state", "error")),
)


# -- database commands (no agent needed) ------------------------------------


def _database(conf: cfg.ConfigOpts) -> Any:
    # Imported here: SQLAlchemy and Alembic double the start-up time of the
    # commands that only talk to the socket.
    from compute_agent.db.api import Database
    from compute_agent.db.engine import Deadlines

    ensure_state_path(conf)
    return Database(
        conf.database.connection,
        conf.database.pool_size,
        Deadlines.from_conf(conf.database),
        transaction_pooling=conf.database.transaction_pooling,
    )


def cmd_db_sync(conf: cfg.ConfigOpts) -> int:
    from compute_agent.db import migration

    db = _database(conf)
    before = migration.current_revision(db)
    after = migration.upgrade(db)
    if before == after:
        print(f"database {db.safe_url} already at revision {after}")
    else:
        print(f"database {db.safe_url} migrated from {before or 'empty'} to {after}")
    return EXIT_OK


def cmd_db_version(conf: cfg.ConfigOpts) -> int:
    from compute_agent.db import migration

    db = _database(conf)
    current = migration.current_revision(db)
    print(f"current {current or 'none'}, head {migration.head_revision()}")
    return EXIT_OK


PURGE_COLUMNS = ("table", "rows", "which")
# The furthest back --older-than may reach (the cut must stay a datetime).
MAX_DAYS = 36500.0


def _days(value: str) -> float:
    """An argparse type: days, a number from 0 (everything deleted so far)."""
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of days: {value[:80]!r}") from None
    if not 0 <= number <= MAX_DAYS:  # NaN fails both
        raise argparse.ArgumentTypeError(f"must be from 0 to {MAX_DAYS:g} days, not {value[:80]}")
    return number


def _iso_time(value: str) -> dt.datetime:
    """An argparse type: an ISO 8601 time, UTC unless it says otherwise; naive UTC out."""
    try:
        when = dt.datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not an ISO 8601 time (e.g. 2026-01-31T12:00:00Z): {value[:80]!r}"
        ) from None
    if when.tzinfo is not None:
        when = when.astimezone(dt.UTC).replace(tzinfo=None)
    return when


def cmd_db_purge(conf: cfg.ConfigOpts) -> int:
    """Remove soft-deleted instances (and, with --actions, old audit rows), archive first."""
    from compute_agent.db import purge
    from compute_agent.utils import utcnow

    a = _args(conf)
    cut = a.purge_before if a.purge_before is not None else purge.cut_before(a.older_than, utcnow())
    db = _database(conf)
    archive = None
    if a.archive and not a.dry_run:
        try:
            archive = purge.Archive(a.archive)
        except exception.InvalidInput as exc:
            raise Fatal(str(exc)) from None
    try:
        purger = purge.Purger(db, batch=a.batch, archive=archive)
        if a.dry_run:
            counts = purger.count(cut, cut if a.actions else None)
        else:
            counts = purger.purge_deleted(cut)
            if a.actions:
                counts.add(purger.purge_actions(cut))
    finally:
        if archive is not None:
            archive.close()
        db.dispose()
    when = cut.isoformat(timespec="seconds") + "Z"
    rows = [
        {"table": "instances", "rows": counts.instances, "which": f"deleted before {when}"},
        {"table": "instance_actions", "rows": counts.instance_actions, "which": "of those"},
    ]
    if a.actions:
        rows.append(
            {
                "table": "instance_actions",
                "rows": counts.live_instance_actions,
                "which": f"of live instances, before {when}",
            }
        )
    if a.out_format == "json":
        record = {"before": when, "dry_run": a.dry_run, **counts.as_dict()}
        if archive is not None:
            record["archive"] = a.archive
        print(json.dumps(record, indent=2))
        return EXIT_OK
    output.emit_list(sys.stdout, a.out_format, rows, PURGE_COLUMNS)
    if a.dry_run and a.out_format == "table":
        print("dry run: nothing removed")
    if counts.left:
        print(
            f"{PROG}: note: {counts.left} instance(s) got an audit row while the purge ran; "
            "left for the next purge",
            file=sys.stderr,
        )
    return EXIT_OK


# -- agent commands (through the admin socket) ------------------------------


def _args(conf: cfg.ConfigOpts) -> Any:
    return conf.category


def _call(
    conf: cfg.ConfigOpts,
    method: str,
    args: dict[str, Any] | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> Any:
    client = AdminClient(conf.admin_socket, timeout=_timeout(conf, method, args or {}))
    return client.call(method, args, on_progress=on_progress)


def _timeout(conf: cfg.ConfigOpts, method: str, args: dict[str, Any]) -> float:
    """``--timeout``, or a default that fits the call.

    A stop may rightly wait ``[compute] shutdown_timeout`` for the guest (and
    a one-instance sync for a stop that holds the instance's lock); a read
    has no reason to take more than DEFAULT_TIMEOUT. A whole-host power sync
    waits DEFAULT_TIMEOUT between progress lines, however long it runs.
    """
    given = getattr(_args(conf), "reply_timeout", None)
    if given is not None:
        return float(given)
    if method in OPERATIONS or (method == "sync_power_states" and args.get("instance_uuid")):
        compute = getattr(conf, "compute", None)
        shutdown = float(getattr(compute, "shutdown_timeout", 60) or 0)
        return DEFAULT_TIMEOUT + shutdown + OPERATION_MARGIN
    return DEFAULT_TIMEOUT


def _uuid(value: str) -> str:
    """An argparse type: checked here, so a typo never reaches the agent."""
    if not is_uuid(value):
        raise argparse.ArgumentTypeError(f"invalid UUID {value[:80]!r}")
    return value.lower()


def _ref(value: str) -> str:
    """An argparse type: a UUID or a display name (checked to be one line)."""
    if not value or len(value) > 255 or not value.isprintable():
        raise argparse.ArgumentTypeError(f"invalid instance UUID or name {value[:80]!r}")
    return value


def _reason(value: str) -> str:
    if not value.strip() or len(value) > 255 or not value.isprintable():
        raise argparse.ArgumentTypeError("the reason must be 1 to 255 printable characters")
    return value


def _positive(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {value[:80]!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {number}")
    return number


def _seconds(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {value[:80]!r}") from None
    if not number > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, not {value[:80]}")
    if not number <= MAX_TOTAL:  # inf, and a deadline no socket can be given
        raise argparse.ArgumentTypeError(f"must be at most {MAX_TOTAL:g}, not {value[:80]}")
    return number


def _show(conf: cfg.ConfigOpts, record: dict[str, Any]) -> None:
    a = _args(conf)
    output.emit_one(sys.stdout, a.out_format, record, a.out_columns)


class _Progress:
    """'done/total' on a terminal's stderr, rewritten in place; silent otherwise."""

    def __init__(self, stream: TextIO, label: str) -> None:
        self.stream = stream
        self.label = label
        self.enabled = _isatty(stream)
        self.shown = False

    def __call__(self, done: int, total: int) -> None:
        if self.enabled and total:  # 0/0: a keep-alive before the run starts
            self.stream.write(f"\r\x1b[K{self.label}: {done}/{total} instances")
            self.stream.flush()
            self.shown = True

    def end(self) -> None:
        if self.shown:
            self.stream.write("\n")
            self.stream.flush()


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def cmd_power_sync(conf: cfg.ConfigOpts) -> int:
    """Sync now and wait; 0 when the sync ran (per-instance errors are counted
    in the summary and logged by the agent), 1 when it was aborted."""
    a = _args(conf)
    args = {"instance_uuid": a.sync_instance} if a.sync_instance else {}
    progress = _Progress(sys.stderr, "power sync")
    try:
        summary = _call(conf, "sync_power_states", args, on_progress=progress)
    finally:
        progress.end()
    return _report_run(conf, summary, "power sync", "instance(s) could not be synced")


def cmd_reap_deleted(conf: cfg.ConfigOpts) -> int:
    """Look for guests of deleted instances now, act as configured, and wait;
    0 when the run went through (per-domain errors are counted and logged by
    the agent), 1 when it was aborted."""
    summary = _call(conf, "reap_deleted_instances")
    return _report_run(conf, summary, "reap-deleted", "domain(s) could not be handled")


def _report_run(conf: cfg.ConfigOpts, summary: dict[str, Any], run: str, failed: str) -> int:
    """Show a run's summary: exit 1 if it was aborted, a warning line if some items failed."""
    _show(conf, summary)
    if summary.get("aborted"):
        raise Fatal(f"{run} aborted: {summary['aborted']}", EXIT_FAILED)
    if summary.get("errors"):
        print(
            f"{PROG}: warning: {summary['errors']} {failed}; the agent's log says why",
            file=sys.stderr,
        )
    return EXIT_OK


def cmd_status(conf: cfg.ConfigOpts) -> int:
    fmt = _args(conf).out_format
    status = _call(conf, "status")
    if fmt == "json":
        print(json.dumps(status, indent=2))
        return EXIT_OK
    fields: dict[str, Any] = {}
    for name, path in STATUS_FIELDS:
        value = _dig(status, path)
        flattened = ("events", "builds", "running_deleted", "db_purge", "resume", "admin_socket")
        if name in (*flattened, "libvirt_connections") and isinstance(value, dict):
            fields.update(output.flatten(value, f"{name}."))  # one row per counter
        elif name == "power_sync_progress" and isinstance(value, list) and len(value) == 2:
            fields[name] = f"{value[0]}/{value[1]}"
        else:
            fields[name] = value
    if fmt == "value":
        for value in fields.values():
            print(output.cell(value))
    else:
        sys.stdout.write(output.table(("Field", "Value"), fields.items()))
        print("\nPeriodic tasks:")
    output.emit_list(sys.stdout, fmt, status.get("periodic_tasks") or [], TASK_COLUMNS)
    return EXIT_OK


def _dig(obj: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(key)
    return obj


def cmd_instances_list(conf: cfg.ConfigOpts) -> int:
    a = _args(conf)
    rows = [
        r
        for r in _call(conf, "list_instances")
        if (a.vm_state is None or r.get("vm_state") == a.vm_state)
        and (a.power_state is None or r.get("power_state") == a.power_state)
    ]
    output.emit_list(sys.stdout, a.out_format, rows, INSTANCE_COLUMNS, a.out_columns)
    return EXIT_OK


def _resolve(conf: cfg.ConfigOpts, ref: str) -> str:
    """The UUID of the instance ``ref`` names: a UUID as it is, else a unique display name."""
    if is_uuid(ref):
        return ref.lower()
    matches = [r for r in _call(conf, "list_instances") if r.get("name") == ref]
    if not matches:
        raise Fatal(f"no instance of this host is named {ref[:80]!r}", EXIT_FAILED)
    if len(matches) > 1:
        uuids = ", ".join(sorted(str(r.get("uuid")) for r in matches)[:5])
        raise Fatal(
            f"{len(matches)} instances are named {ref[:80]!r} ({uuids}); give the UUID",
            EXIT_FAILED,
        )
    return str(matches[0]["uuid"])


def cmd_instances_show(conf: cfg.ConfigOpts) -> int:
    uuid = _resolve(conf, _args(conf).instance_ref)
    _show(conf, _call(conf, "get_instance_info", {"instance_uuid": uuid}))
    return EXIT_OK


def cmd_instances_stats(conf: cfg.ConfigOpts) -> int:
    uuid = _resolve(conf, _args(conf).instance_ref)
    _show(conf, _call(conf, "get_instance_stats", {"instance_uuid": uuid}))
    return EXIT_OK


def cmd_instances_actions(conf: cfg.ConfigOpts) -> int:
    """The audit trail, oldest first: who changed what, and why."""
    a = _args(conf)
    uuid = _resolve(conf, a.instance_ref)
    rows = _call(conf, "get_instance_actions", {"instance_uuid": uuid, "limit": a.limit})
    output.emit_list(sys.stdout, a.out_format, rows, ACTION_COLUMNS, a.out_columns)
    return EXIT_OK


def _service_set(disabled: bool) -> Callable[[cfg.ConfigOpts], int]:
    def command(conf: cfg.ConfigOpts) -> int:
        args: dict[str, Any] = {"disabled": disabled}
        reason = getattr(_args(conf), "reason", None)
        if reason is not None:
            args["reason"] = reason
        row = _call(conf, "set_service_disabled", args)
        _show(conf, {c: row.get(c) for c in SERVICE_COLUMNS})
        if not disabled and row.get("disabled"):
            print(
                f"{PROG}: warning: the hypervisor is away: the service stays disabled "
                "until it is back",
                file=sys.stderr,
            )
        return EXIT_OK

    command.__name__ = f"cmd_service_{'disable' if disabled else 'enable'}"
    return command


def cmd_instances_boot(conf: cfg.ConfigOpts) -> int:
    a = _args(conf)
    instance = {
        "uuid": a.vm_uuid or str(uuidlib.uuid4()),
        "name": a.vm_name,
        "vcpus": a.vm_vcpus,
        "memory_mb": a.vm_memory_mb,
    }
    _show(conf, _call(conf, "build_instance", {"instance": instance}))
    return EXIT_OK


def _instance_action(method: str) -> Callable[[cfg.ConfigOpts], int]:
    def command(conf: cfg.ConfigOpts) -> int:
        a = _args(conf)
        args: dict[str, Any] = {"instance_uuid": a.instance_uuid}
        if method == "reboot_instance":
            args["hard"] = a.hard_reboot
        _show(conf, _call(conf, method, args))
        return EXIT_OK

    command.__name__ = f"cmd_{method}"
    return command


# -- the parser -------------------------------------------------------------


def _add_format(parser: Any) -> None:
    """``-f/--format``: table (the default), json or value."""
    parser.add_argument(
        "-f",
        "--format",
        dest="out_format",
        choices=output.FORMATS,
        default="table",
        help="the output format (default: table)",
    )


def _common_parents(columns: bool = True) -> list[argparse.ArgumentParser]:
    """Options of every agent command: output format, columns, reply timeout."""
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("output formatters")
    _add_format(group)
    if columns:
        group.add_argument(
            "-c",
            "--column",
            dest="out_columns",
            action="append",
            metavar="COLUMN",
            help="show only this column (repeatable)",
        )
    parent.add_argument(
        "--timeout",
        dest="reply_timeout",
        type=_seconds,
        default=None,
        metavar="SECONDS",
        help=f"exit 3 when the agent has not answered within this long (default: "
        f"{DEFAULT_TIMEOUT:g} s; operations add [compute] shutdown_timeout; "
        "power-sync: between two progress lines)",
    )
    return [parent]


def _add_parsers(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    subparsers.required = True
    subparsers.metavar = "COMMAND"

    db = subparsers.add_parser("db", help="database schema (opens the database itself)")
    db_cmds = db.add_subparsers(dest="action", metavar="ACTION")
    db_cmds.required = True
    db_cmds.add_parser("sync", help="migrate the schema to this version").set_defaults(
        func=cmd_db_sync
    )
    db_cmds.add_parser("version", help="show the schema revision").set_defaults(func=cmd_db_version)
    purge = db_cmds.add_parser(
        "purge",
        help="remove soft-deleted instances and their audit trail (safe beside the agent)",
    )
    when = purge.add_mutually_exclusive_group(required=True)
    when.add_argument(
        "--older-than",
        dest="older_than",
        type=_days,
        metavar="DAYS",
        help="instances deleted more than DAYS days ago (0: every deleted instance)",
    )
    when.add_argument(
        "--before",
        dest="purge_before",
        type=_iso_time,
        metavar="ISO-TIME",
        help="instances deleted before this time (UTC unless it names a zone)",
    )
    purge.add_argument(
        "--actions",
        action="store_true",
        help="also remove audit rows older than the cut of instances that still live",
    )
    purge.add_argument(
        "--archive",
        metavar="FILE",
        help="first append every row to be removed to FILE, as JSON lines (fsynced)",
    )
    purge.add_argument(
        "--batch",
        type=_positive,
        default=1000,
        metavar="N",
        help="rows per transaction (default: 1000)",
    )
    purge.add_argument(
        "--dry-run", dest="dry_run", action="store_true", help="count only; remove nothing"
    )
    _add_format(purge)
    purge.set_defaults(func=cmd_db_purge)

    sync = subparsers.add_parser(
        "power-sync",
        parents=_common_parents(),
        help="sync power states now, wait, and print the summary",
    )
    sync.add_argument(
        "--instance",
        dest="sync_instance",
        type=_uuid,
        metavar="UUID",
        help="sync this instance only (default: every instance of the host)",
    )
    sync.set_defaults(func=cmd_power_sync)

    subparsers.add_parser(
        "reap-deleted",
        parents=_common_parents(),
        help="act now on guests of deleted instances ([compute] "
        "running_deleted_instance_action), wait, and print the summary",
    ).set_defaults(func=cmd_reap_deleted)

    subparsers.add_parser(
        "status",
        parents=_common_parents(columns=False),
        help="the service, libvirt, periodic tasks and hub lag of the running agent",
    ).set_defaults(func=cmd_status)

    inst = subparsers.add_parser("instances", help="the instances of this host")
    inst_cmds = inst.add_subparsers(dest="action", metavar="ACTION")
    inst_cmds.required = True
    listing = inst_cmds.add_parser(
        "list", parents=_common_parents(), help="list the instances of this host"
    )
    listing.add_argument(
        "--vm-state",
        dest="vm_state",
        choices=[s.value for s in VmState],
        help="only the instances in this state",
    )
    listing.add_argument(
        "--power-state",
        dest="power_state",
        choices=[p.value for p in PowerState],
        help="only the instances in this power state",
    )
    listing.set_defaults(func=cmd_instances_list)
    func: Callable[[cfg.ConfigOpts], int]
    for name, func, what in (
        ("show", cmd_instances_show, "show an instance (by UUID or name)"),
        ("stats", cmd_instances_stats, "show an instance's latest statistics sample"),
        ("actions", cmd_instances_actions, "the audit trail of an instance, oldest first"),
    ):
        p = inst_cmds.add_parser(name, parents=_common_parents(), help=what)
        p.add_argument("instance_ref", type=_ref, metavar="UUID_OR_NAME")
        if name == "actions":
            p.add_argument(
                "--limit",
                type=_positive,
                default=100,
                metavar="N",
                help="the latest N rows (default: 100, at most 1000)",
            )
        p.set_defaults(func=func)
    for name, func, what in (
        ("start", _instance_action("start_instance"), "power an instance on"),
        ("stop", _instance_action("stop_instance"), "power an instance off"),
        ("reboot", _instance_action("reboot_instance"), "reboot an instance"),
        ("delete", _instance_action("delete_instance"), "delete an instance and its domain"),
    ):
        p = inst_cmds.add_parser(name, parents=_common_parents(), help=what)
        p.add_argument("instance_uuid", type=_uuid, metavar="UUID")
        if name == "reboot":
            p.add_argument(
                "--hard",
                dest="hard_reboot",
                action="store_true",
                help="reset the domain instead of asking the guest to reboot",
            )
        p.set_defaults(func=func)
    boot = inst_cmds.add_parser(
        "boot", parents=_common_parents(), help="build and start a new instance, and wait"
    )
    boot.add_argument("--name", dest="vm_name", required=True, help="display name")
    boot.add_argument("--vcpus", dest="vm_vcpus", type=_positive, required=True, metavar="N")
    boot.add_argument(
        "--memory-mb", dest="vm_memory_mb", type=_positive, required=True, metavar="MB"
    )
    boot.add_argument(
        "--uuid", dest="vm_uuid", type=_uuid, metavar="UUID", help="(default: a new one)"
    )
    boot.set_defaults(func=cmd_instances_boot)

    svc = subparsers.add_parser("service", help="this host's compute service")
    svc_cmds = svc.add_subparsers(dest="action", metavar="ACTION")
    svc_cmds.required = True
    svc_cmds.add_parser(
        "enable", parents=_common_parents(), help="let the scheduler place instances here"
    ).set_defaults(func=_service_set(False))
    disable = svc_cmds.add_parser(
        "disable",
        parents=_common_parents(),
        help="keep the scheduler from placing instances here (until enabled)",
    )
    disable.add_argument("--reason", type=_reason, help="why, for the other operators")
    disable.set_defaults(func=_service_set(True))


def register_cli(conf: cfg.ConfigOpts) -> None:
    conf.register_cli_opt(cfg.SubCommandOpt("category", title="commands", handler=_add_parsers))


# argparse's last line on a usage error: "<prog and command>: error: <message>".
_USAGE_ERROR = re.compile(r"^(?P<where>.*?): error: (?P<message>.*)$")


def _parse(argv: Sequence[str]) -> None:
    """Load config and arguments; a usage error becomes one line, not argparse's two."""
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            load_config(CONF, argv, PROG)
    except SystemExit as exc:
        if exc.code in (0, None):
            sys.stderr.write(captured.getvalue())
            raise
        lines = captured.getvalue().strip().splitlines()
        match = _USAGE_ERROR.match(lines[-1]) if lines else None
        if match is None:
            raise Fatal(lines[-1] if lines else "invalid arguments", EXIT_USAGE) from None
        where = match["where"].removeprefix(PROG).strip()
        hint = f"; see '{PROG} {where + ' ' if where else ''}--help'"
        message = (f"{where}: " if where else "") + match["message"] + hint
        raise Fatal(message, EXIT_USAGE) from None
    sys.stderr.write(captured.getvalue())


def run(argv: Sequence[str]) -> int:
    register_cli(CONF)
    _parse(argv)
    try:
        concurrency.check_configured(CONF.concurrency_backend)
    except concurrency.BackendChoiceError as exc:
        raise Fatal(str(exc), EXIT_USAGE) from None
    log.setup(CONF)
    # Alembic, imported only now (after logging is set up), logs its plugins at INFO.
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
    func: Callable[[cfg.ConfigOpts], int] = CONF.category.func
    try:
        return func(CONF)
    except AgentUnreachable as exc:
        raise Fatal(str(exc), EXIT_NO_AGENT) from None
    except RemoteError as exc:
        # The agent's InvalidInput says the arguments were wrong: a usage error.
        status = EXIT_USAGE if exc.type == "InvalidInput" else EXIT_FAILED
        raise Fatal(f"{exc.type}: {exc.message}", status) from None
    except ClientError as exc:
        raise Fatal(str(exc), EXIT_FAILED) from None
    except ColumnError as exc:
        raise Fatal(str(exc), EXIT_USAGE) from None
    except exception.DatabaseUnavailable as exc:
        # A db command's own database: down, refusing, or silent past its deadline.
        raise Fatal(str(exc)) from None
    except Exception as exc:
        # SQLAlchemy's errors, without importing SQLAlchemy for every command.
        sa_exc = sys.modules.get("sqlalchemy.exc")
        if sa_exc is not None and isinstance(exc, sa_exc.SQLAlchemyError):
            first = (str(exc).splitlines() or [""])[0]
            raise Fatal(f"database error: {type(exc).__name__}: {first}") from None
        raise


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return run(sys.argv[1:] if argv is None else argv)
    except Fatal as exc:
        return fail(PROG, str(exc), exc.status)
    except KeyboardInterrupt:
        return fail(PROG, "interrupted (an operation already asked of the agent goes on)", 1)
    except BrokenPipeError:
        return EXIT_FAILED  # stdout closed early (| head): nothing more to say
    except Exception as exc:  # noqa: BLE001 - a bug still gets one line, not a traceback
        return fail(PROG, f"unexpected {type(exc).__name__}: {exc}", EXIT_FAILED)


if __name__ == "__main__":
    sys.exit(main())
