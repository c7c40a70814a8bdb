"""Options of the ``[libvirt]`` group."""

from __future__ import annotations

from oslo_config import cfg

from compute_agent.conf.groups import register_group

group = cfg.OptGroup("libvirt", title="Libvirt driver options")

opts = [
    cfg.StrOpt(
        "connection_uri",
        default="test:///default",
        help="Libvirt connection URI. The default is libvirt's built-in test "
        "driver, so the agent runs anywhere; a KVM host uses qemu:///system.",
    ),
    cfg.StrOpt(
        "virt_type",
        default="auto",
        choices=[
            ("auto", "test for libvirt's test driver; kvm when /dev/kvm exists; else qemu"),
            ("kvm", "hardware-accelerated QEMU"),
            ("qemu", "QEMU emulation (TCG)"),
            ("test", "libvirt's test driver"),
        ],
        help="Domain type of the domains the agent defines.",
    ),
    cfg.FloatOpt(
        "reconnect_min_delay",
        default=1.0,
        min=0.01,
        help="First delay in seconds before reconnecting to a lost libvirt; it "
        "doubles after each failed attempt.",
    ),
    cfg.FloatOpt(
        "reconnect_max_delay",
        default=30.0,
        min=0.01,
        help="Longest delay in seconds between reconnection attempts.",
    ),
    cfg.IntOpt(
        "keepalive_interval",
        default=5,
        min=0,
        help="Seconds between keepalive messages on a remote libvirt connection; "
        "0 disables them (a dead daemon is then noticed only when a call fails).",
    ),
    cfg.IntOpt(
        "keepalive_count",
        default=3,
        min=1,
        help="Unanswered keepalives after which the libvirt connection is closed.",
    ),
    cfg.IntOpt(
        "connection_pool_size",
        default=4,
        min=1,
        help="libvirt connections that carry the agent's calls, each one call at a time "
        "(libvirt's client crashes when several threads wait on one connection that its "
        "keepalive closes). More calls than this wait for a free connection. Events "
        "have a connection of their own. On a node file of libvirt's test driver "
        "(test:///path.xml) one connection carries everything, since each connection "
        "holds its own copy of that host.",
    ),
    cfg.FloatOpt(
        "stuck_call_timeout",
        default=10.0,
        min=0.1,
        help="Seconds after which a call still running in libvirt (a hung QEMU monitor, "
        "a frozen libvirtd) has its connection set aside, so that a new connection "
        "carries the other calls; the set-aside one is closed when its call returns.",
    ),
    cfg.IntOpt(
        "max_stuck_connections",
        default=8,
        min=0,
        help="At most this many connections set aside at once; past it, calls wait "
        "for a connection to free. Each holds a native thread until its call returns.",
    ),
    cfg.FloatOpt(
        "lifecycle_event_delay",
        default=15.0,
        min=0,
        help="Seconds a shut-off, crashed or paused domain must stay so, and be read "
        "again, before it counts (vm_state stopped, an enforced stop): a reboot is "
        "shut off for a moment and QEMU pauses while it starts. A STOPPED lifecycle "
        "event waits this long before the instance is synced, and any later event "
        "for the same domain cancels it; operations wait out such states this long.",
    ),
]


def register(conf: cfg.ConfigOpts) -> None:
    register_group(conf, group, opts)
