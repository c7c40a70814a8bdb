"""Options of the ``[compute]`` group: how the agent looks after its instances."""

from __future__ import annotations

from oslo_config import cfg

from compute_agent.conf.groups import register_group

group = cfg.OptGroup("compute", title="Compute manager options")

opts = [
    cfg.IntOpt(
        "sync_power_state_interval",
        default=600,
        help="Seconds between power-state syncs of every instance on this host. "
        "0 or a negative value disables the periodic sync (it can still be run on "
        "demand).",
    ),
    cfg.IntOpt(
        "sync_power_state_concurrency",
        default=4,
        min=1,
        max=1000,
        help="How many instances the power-state sync handles at once. Each still "
        "yields to the rest of the agent after every instance.",
    ),
    cfg.StrOpt(
        "power_sync_source",
        default="get_info",
        choices=[
            ("get_info", "ask the driver for each instance's state, one call each"),
            ("bulk", "read every state in one bulk driver call per sync"),
        ],
        help="Where the power-state sync reads the hypervisor's states.",
    ),
    cfg.StrOpt(
        "power_sync_action",
        default="enforce",
        choices=[
            ("enforce", "stop a domain that runs while its instance is stopped"),
            ("report", "only record the disagreement"),
        ],
        help="What the power-state sync does when an instance the database says is "
        "stopped is running, paused or suspended on the hypervisor.",
    ),
    cfg.IntOpt(
        "shutdown_timeout",
        default=60,
        min=0,
        help="Seconds a guest is given to shut down when asked before it is forced "
        "off. 0 forces it off at once.",
    ),
    cfg.BoolOpt(
        "handle_lifecycle_events",
        default=True,
        help="Listen to the hypervisor's lifecycle events (started, stopped, paused, "
        "resumed, ...) and sync the instance concerned at once. When false, changes "
        "made outside the agent are seen only by the periodic power-state sync.",
    ),
    cfg.IntOpt(
        "max_concurrent_builds",
        default=10,
        min=0,
        help="How many instance builds may run at once; further builds wait in the "
        "'queued' task state. 0 means no limit.",
    ),
    cfg.BoolOpt(
        "resume_guests_state_on_host_boot",
        default=False,
        help="After the host boots, start again the guests that were running before "
        "(vm_state active, domain now off), at most max_concurrent_builds at a time, "
        "before the first power-state sync. When false they are recorded as stopped by "
        "that sync. A host boot is told from an agent restart by the kernel's boot id.",
    ),
    cfg.StrOpt(
        "host_boot_id_path",
        default="/proc/sys/kernel/random/boot_id",
        advanced=True,
        help="File holding the kernel's boot id, which changes at every host boot. "
        "Only tests change it, to simulate a host boot.",
    ),
    cfg.IntOpt(
        "stats_interval",
        default=60,
        help="Seconds between samples of every instance's statistics (CPU, memory, "
        "vCPUs, interfaces, disks), taken in one bulk call where the driver has one. "
        "0 or a negative value disables sampling.",
    ),
    cfg.IntOpt(
        "stats_call_timeout",
        default=30,
        min=1,
        help="Seconds a statistics call may take before the cycle gives up on it. A "
        "call to a hung QEMU can block for ever; it is left in its thread and the "
        "next cycle goes on without it.",
    ),
    cfg.IntOpt(
        "stats_unresponsive_after",
        default=300,
        min=1,
        help="An instance with no complete statistics sample for this many seconds "
        "is reported unresponsive.",
    ),
    cfg.IntOpt(
        "running_deleted_instance_poll_interval",
        default=1800,
        help="Seconds between two looks for guests of deleted instances that are "
        "still on the hypervisor (a domain whose name and UUID are those of a "
        "soft-deleted instance of this host). 0 or a negative value disables the "
        "periodic look (it can still be run on demand with "
        "compute-agent-manage reap-deleted).",
    ),
    cfg.StrOpt(
        "running_deleted_instance_action",
        default="reap",
        choices=[
            ("reap", "force the guest off and remove its definition"),
            ("shutdown", "force the guest off and keep its definition"),
            ("log", "only log a warning (and audit it)"),
            ("noop", "do nothing; such guests are only counted"),
        ],
        help="What is done to a guest of a deleted instance of this host. A domain "
        "whose name or UUID matches no deleted instance of this host is never "
        "touched.",
    ),
    cfg.IntOpt(
        "running_deleted_instance_max_per_run",
        default=50,
        min=1,
        max=10000,
        help="At most this many guests of deleted instances are handled per run; "
        "the rest wait for the next run.",
    ),
    cfg.StrOpt(
        "instance_name_template",
        default="instance-%(uuid)s",
        help="Template of the libvirt domain name of an instance. It may use "
        "%(uuid)s; the default uses the instance UUID, so two instances can "
        "never share a domain name.",
    ),
]


def register(conf: cfg.ConfigOpts) -> None:
    register_group(conf, group, opts)
