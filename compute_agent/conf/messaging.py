"""oslo.messaging's own ``[DEFAULT]`` options (``transport_url`` and the RPC timeouts).

Registered with the agent's so the whole configuration is checked at start
and appears in the sample file; oslo.messaging registers the same option
objects again when it opens a transport, which oslo.config accepts.
"""

from __future__ import annotations

from oslo_config import cfg
from oslo_messaging import opts as messaging_opts


def _default_opts() -> list[cfg.Opt]:
    for group, opts in messaging_opts.list_opts():
        if group in (None, "DEFAULT"):
            return list(opts)
    return []


opts = _default_opts()


def register(conf: cfg.ConfigOpts) -> None:
    conf.register_opts(opts)
