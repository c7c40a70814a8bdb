"""Options of the ``[DEFAULT]`` group: who this host is and where it keeps state."""

from __future__ import annotations

import os
import socket

from oslo_config import cfg


def _default_state_path() -> str:
    # Root runs the agent on real hosts; anyone else (a developer) gets a
    # per-user directory instead of a permission error.
    if os.geteuid() == 0:
        return "/var/lib/compute-agent"
    return os.path.join(os.path.expanduser("~"), ".local", "state", "compute-agent")


opts = [
    cfg.HostDomainOpt(
        "host",
        default=socket.gethostname(),
        sample_default="<hostname>",
        help="Name of this host as the scheduler and the database know it. "
        "Instances are claimed by this name, so it must be unique in the cloud.",
    ),
    cfg.StrOpt(
        "state_path",
        default=_default_state_path(),
        sample_default="/var/lib/compute-agent",
        help="Directory for the agent's local state (the default SQLite database, "
        "the admin socket).",
    ),
    cfg.StrOpt(
        "compute_driver",
        default="libvirt",
        choices=[
            ("libvirt", "the libvirt driver, on [libvirt] connection_uri"),
            ("fake", "an in-memory driver for tests and benchmarks; manages nothing real"),
        ],
        help="The virt driver the agent manages instances through.",
    ),
    cfg.StrOpt(
        "concurrency_backend",
        default="eventlet",
        choices=[
            ("eventlet", "green threads on one hub (eventlet, in bugfix-only maintenance)"),
            ("threads", "native threads; eventlet and greenlet are never loaded"),
        ],
        help="How the agent runs concurrent work. Read once at start, from the config "
        "files only (not the command line); the environment variable "
        "COMPUTE_AGENT_CONCURRENCY, if set, takes precedence. The start-up log line, "
        "`compute-agent-manage status` and /metrics say which backend runs.",
    ),
    cfg.IntOpt(
        "report_interval",
        default=10,
        min=1,
        help="Seconds between heartbeats written to this host's service row.",
    ),
    cfg.IntOpt(
        "service_down_time",
        default=60,
        min=1,
        help="A service whose last heartbeat is older than this many seconds is "
        "considered down, as a scheduler would judge it.",
    ),
    cfg.IntOpt(
        "periodic_fuzzy_delay",
        default=60,
        min=0,
        help="Each periodic task first runs after a random delay of up to this many "
        "seconds, so that hosts started together do not hit the database together.",
    ),
    cfg.FloatOpt(
        "hub_lag_interval",
        default=0.1,
        min=0.01,
        help="Seconds between the hub-lag monitor's wake-ups.",
    ),
    cfg.FloatOpt(
        "hub_lag_warning",
        default=0.2,
        min=0.001,
        help="Log a warning, naming the greenthread that ran longest, when the hub "
        "wakes the lag monitor later than this many seconds.",
    ),
    cfg.FloatOpt(
        "graceful_shutdown_timeout",
        default=3.0,
        min=0,
        help="Seconds a running periodic task may take to finish when the agent "
        "stops before it is cancelled.",
    ),
    cfg.IntOpt(
        "native_thread_pool_size",
        default=32,
        min=4,
        max=1024,
        help="Native threads that run blocking calls (every libvirt call) off the "
        "event loop. It bounds how many such calls run at once: builds beyond it "
        "wait even under a higher [compute] max_concurrent_builds.",
    ),
    cfg.IntOpt(
        "max_concurrent_requests",
        default=64,
        min=1,
        max=1024,
        help="Requests that do work (build, start, stop, reboot, delete, power sync, "
        "list of instances) run at most this many at once, RPC and admin socket "
        "together; the others wait their turn in arrival order. Read-only requests "
        "(ping, host state, one instance, status) never wait. A request holds its "
        "turn until it ends, a stop waiting for a slow guest included, so a low "
        "value lets a few slow guests hold up every other operation; builds have "
        "their own limit, [compute] max_concurrent_builds. RPC requests also wait "
        "in the broker while executor_thread_pool_size of them are taken in.",
    ),
    cfg.IntOpt(
        "refusal_log_interval",
        default=10,
        min=1,
        help="Seconds over which refused RPC requests are summed up: the first refusal "
        "of a method and error type is logged in full, the others of that window in "
        "one line at its end.",
    ),
    cfg.FloatOpt(
        "rpc_duplicate_check_timeout",
        default=3.0,
        min=0,
        max=60,
        help="Before it serves RPC, the agent pings its own server name (topic "
        "compute, server = host) and waits this many seconds: an answer means another "
        "agent with the same host name serves on this broker, and this one stops "
        "(exit status 1). 0 skips the check. RPC serving starts this much later.",
    ),
    cfg.StrOpt(
        "admin_socket",
        default="$state_path/admin.sock",
        help="Path of the local UNIX socket (mode 0600) through which "
        "compute-agent-manage talks to the running agent.",
    ),
    cfg.BoolOpt(
        "debug",
        default=False,
        mutable=True,
        help="Log at DEBUG level, and every option's value at start (secrets masked). "
        "Re-read on SIGHUP.",
    ),
    cfg.StrOpt(
        "log_file",
        help="Write the log to this file instead of standard error. The file is "
        "reopened when it is renamed or removed (logrotate needs no copytruncate) and "
        "on SIGHUP.",
    ),
    cfg.BoolOpt(
        "use_syslog",
        default=False,
        help="Send the log to the local syslog socket /dev/log (journald reads it "
        "too) instead of log_file or standard error.",
    ),
    cfg.StrOpt(
        "syslog_log_facility",
        default="daemon",
        choices=[
            "daemon",
            "user",
            "local0",
            "local1",
            "local2",
            "local3",
            "local4",
            "local5",
            "local6",
            "local7",
        ],
        help="The syslog facility of the agent's messages, with use_syslog.",
    ),
]


def register(conf: cfg.ConfigOpts) -> None:
    conf.register_opts(opts)
