"""Registering an option group without sharing state between configurations."""

from __future__ import annotations

from oslo_config import cfg


def register_group(conf: cfg.ConfigOpts, group: cfg.OptGroup, opts: list[cfg.Opt]) -> None:
    """Register ``opts`` under a copy of ``group`` made for ``conf`` alone.

    oslo.config copies a registered group shallowly: every configuration
    given the module's group object would share one table of options, and
    with it every ``set_override``.
    """
    conf.register_group(cfg.OptGroup(group.name, title=group.title, help=group.help))
    conf.register_opts(opts, group=group.name)
