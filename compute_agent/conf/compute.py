"""Options of the ``[compute]`` group: how the agent looks after its instances."""

from __future__ import annotations

from oslo_config import cfg

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
    cfg.StrOpt(
        "instance_name_template",
        default="instance-%(uuid)s",
        help="Template of the libvirt domain name of an instance. It may use "
        "%(uuid)s; the default uses the instance UUID, so two instances can "
        "never share a domain name.",
    ),
]


def register(conf: cfg.ConfigOpts) -> None:
    conf.register_group(group)
    conf.register_opts(opts, group=group)
