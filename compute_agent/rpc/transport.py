"""Opening the oslo.messaging transport, for the server and for callers alike."""

from __future__ import annotations

import importlib
import logging

import oslo_messaging
from oslo_config import cfg

from compute_agent.rpc import EXCEPTION_MODULE
from compute_agent.utils import mask_url_password


def get_transport(conf: cfg.ConfigOpts, url: str | None = None) -> oslo_messaging.Transport:
    """An RPC transport on ``url`` (default ``[DEFAULT] transport_url``).

    The agent's exception module is allowed, so a caller receives real
    ``compute_agent.exception`` classes rather than a bare RemoteError.
    """
    _register_global_only_opts(conf)
    return oslo_messaging.get_rpc_transport(conf, url=url, allowed_remote_exmods=[EXCEPTION_MODULE])


# oslo.messaging option groups registered on the global CONF only: (module, list, group).
_GLOBAL_ONLY_OPTS = (
    ("oslo_messaging._tracing.client", "oslo_messaging_tracing", "oslo_messaging_tracing"),
    ("oslo_messaging._metrics.client", "oslo_messaging_metrics", "oslo_messaging_metrics"),
)


def _register_global_only_opts(conf: cfg.ConfigOpts) -> None:
    """Register on ``conf`` the option groups oslo.messaging puts on the global CONF only.

    oslo.messaging 18 reads its tracing and metrics options from the
    transport's conf on every send and receive, yet registers them on
    ``cfg.CONF`` alone, so any other ConfigOpts (tests, benchmarks, a
    scheduler's own) fails without this.
    """
    for module_name, attr, group in _GLOBAL_ONLY_OPTS:
        try:
            module = importlib.import_module(module_name)
        except ImportError:  # a release without it
            continue
        conf.register_opts(getattr(module, attr), group=group)


def transport_url_is_set(conf: cfg.ConfigOpts) -> bool:
    """Whether ``[DEFAULT] transport_url`` was given (file, command line or override).

    oslo.messaging defaults it to ``rabbit://`` (guest on localhost), so its
    value alone cannot say "no broker"; an agent with no broker configured
    must not go looking for one.
    """
    if not conf.transport_url:
        return False
    location = conf.get_location("transport_url")
    return location is None or location.location is not cfg.Locations.opt_default


def safe_url(url: str | None) -> str:
    """The transport URL fit for a log line: every password masked."""
    return mask_url_password(url) if url else "<none>"


def check_transport_url(conf: cfg.ConfigOpts) -> None:
    """A transport_url oslo cannot use fails now in one line, not at RPC start in a traceback.

    oslo checks only the URL's form, and only when the server starts; an
    unknown driver or a port out of range would otherwise surface later, or
    as a connection retried for ever.
    """
    if not transport_url_is_set(conf):
        return
    # stevedore warns of a driver it cannot load: the one line below says it.
    stevedore = logging.getLogger("stevedore.named")
    level = stevedore.level
    stevedore.setLevel(logging.ERROR)
    try:
        url = oslo_messaging.TransportURL.parse(conf, conf.transport_url)
        for host in url.hosts:
            if host.port is not None and not 0 < host.port < 65536:
                raise ValueError(f"port {host.port} is out of range")
        get_transport(conf).cleanup()  # loads the driver; connects to nothing
    except (oslo_messaging.MessagingException, ValueError, ImportError) as exc:
        raise ValueError(
            f"transport_url {safe_url(conf.transport_url)!r} is not usable: {exc}"
        ) from None
    finally:
        stevedore.setLevel(level)
