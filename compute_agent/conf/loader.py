"""Parse the command line and config files, and check every value up front.

oslo.config reads values lazily; an agent that only discovers a bad value
when a task first reads it, minutes after start, is an agent that crashes in
production. ``load`` reads every option once so that a mistake is reported
as one line before anything starts.
"""

from __future__ import annotations

import configparser
import logging
import os
import re
import urllib.parse
from collections.abc import Sequence

from oslo_config import cfg

from compute_agent import __version__
from compute_agent.conf.opts import list_opts
from compute_agent.exception import ConfigError
from compute_agent.utils import URL_CREDENTIALS
from compute_agent.virt.spec import DOMAIN_NAME_RE, render_domain_name

LOG = logging.getLogger(__name__)


def load(conf: cfg.ConfigOpts, argv: Sequence[str], prog: str) -> None:
    """Parse ``argv`` into ``conf`` and validate it; raise ConfigError if unusable."""
    try:
        conf(list(argv), project="compute-agent", prog=prog, version=__version__)
        _read_every_option(conf)
        _check_name_template(conf.compute.instance_name_template)
        _check_admin_socket(conf.admin_socket)
        _check_transport_url(conf.transport_url)
        _check_log_file(conf.log_file)
    except cfg.ConfigFilesNotFoundError as exc:
        raise ConfigError(f"config file not found: {', '.join(exc.config_files)}") from None
    except cfg.ConfigFilesPermissionDeniedError as exc:
        raise ConfigError(f"config file not readable: {', '.join(exc.config_files)}") from None
    except cfg.ConfigFileParseError as exc:
        raise ConfigError(f"config file {exc.config_file} is malformed: {exc.msg}") from None
    except (cfg.ConfigFileValueError, cfg.ConfigSourceValueError) as exc:
        raise ConfigError(_one_line(_LOCATION.sub(r"in \g<file>", str(exc)))) from None
    except cfg.Error as exc:
        raise ConfigError(_one_line(str(exc))) from None
    except OSError as exc:
        path = exc.filename or _unreadable(argv) or "(one of the --config-file)"
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        path = _unreadable(argv) or "(one of the --config-file)"
        raise ConfigError(
            f"config file {path} is not UTF-8: {exc.reason} at byte {exc.start}"
        ) from None
    except ValueError as exc:
        raise ConfigError(_one_line(str(exc))) from None


# oslo names the file of a bad value as "from LocationInfo(location=<...>, detail='<file>')".
_LOCATION = re.compile(r"from LocationInfo\(location=<[^>]*>, detail='(?P<file>[^']*)'\)")


def _unreadable(argv: Sequence[str]) -> str | None:
    """The first ``--config-file`` in ``argv`` that cannot be read as UTF-8 text.

    oslo's errors for such a file do not always name it (a decoding error
    never does), and an operator with several files needs to know which.
    """
    paths = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--config-file"]
    paths += [a.split("=", 1)[1] for a in argv if a.startswith("--config-file=")]
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                f.read()
        except (OSError, UnicodeDecodeError):
            return path
    return None


def doubtful_settings(conf: cfg.ConfigOpts) -> list[str]:
    """Values valid one by one that work against each other: warned of at start."""
    found = []
    c = conf.compute
    if (
        c.stats_interval > 0
        and c.stats_unresponsive_after <= c.stats_interval + c.stats_call_timeout
    ):
        # Seen with 3 <= 1 + 2: one call reaching its deadline left every
        # instance without a sample for longer than the threshold.
        found.append(
            f"[compute] stats_unresponsive_after ({c.stats_unresponsive_after} s) is not more "
            f"than stats_interval + stats_call_timeout ({c.stats_interval} + "
            f"{c.stats_call_timeout} s): one slow statistics call will report every "
            "instance unresponsive"
        )
    return found


def unknown_options(conf: cfg.ConfigOpts) -> list[str]:
    """``group.option`` names found in the config files that no code registers.

    A misspelt option is otherwise silently ignored, which is how an operator
    ends up running on defaults they believe they changed.
    """
    known = {group: {opt.dest for opt in opts} for group, opts in list_opts()}
    found = []
    for path in conf.config_file or []:
        parser = configparser.ConfigParser(strict=False, interpolation=None)
        try:
            parser.read(path)
        except (configparser.Error, OSError, UnicodeDecodeError):
            continue  # oslo.config accepted it; this check is advisory only
        for section in [parser.default_section, *parser.sections()]:
            if section not in known:
                continue
            items = parser.defaults() if section == parser.default_section else parser[section]
            for key in items:
                name = key.replace("-", "_")
                if name not in known[section] and not (
                    section != parser.default_section and key in parser.defaults()
                ):
                    found.append(f"{section}.{key}")
    return sorted(set(found))


# sun_path of a UNIX socket address holds 108 bytes, the final NUL included.
MAX_SOCKET_PATH = 107


def _check_admin_socket(path: str) -> None:
    if not path or len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise ValueError(
            f"admin_socket {path!r} must be a path of 1 to {MAX_SOCKET_PATH} bytes "
            "(the limit of a UNIX socket address)"
        )


def _check_transport_url(url: str | None) -> None:
    """A rabbit password holding '/' can never log in: refuse it now.

    oslo.messaging rebuilds the URL for kombu with ``quote()``, which leaves
    '/' as is, so kombu reads the password up to the '/' as the port: the
    agent would run without RPC, and kombu's error quotes the password.
    """
    if not url or not url.startswith("rabbit:"):
        return
    for match in URL_CREDENTIALS.finditer(url):
        if "/" in urllib.parse.unquote(match.group("pw")):
            raise ValueError(
                "[DEFAULT] transport_url: a RabbitMQ password holding '/' cannot be used "
                "(oslo.messaging passes it to the broker client unescaped); choose another"
            )


def _check_log_file(path: str | None) -> None:
    """The log file must open now: later, the failure would have nowhere to be logged."""
    if not path:
        return
    try:
        with open(path, "a", encoding="utf-8"):
            pass
    except OSError as exc:
        raise ValueError(f"log_file {path} cannot be opened: {exc.strerror}") from None


def _check_name_template(template: str) -> None:
    a = "00000000-0000-4000-8000-000000000001"
    b = "00000000-0000-4000-8000-000000000002"
    try:
        name_a, name_b = render_domain_name(template, a), render_domain_name(template, b)
    except (KeyError, ValueError, TypeError) as exc:
        raise ValueError(
            f"[compute] instance_name_template {template!r} is not a valid template: {exc}"
        ) from None
    if name_a == name_b:
        raise ValueError(
            f"[compute] instance_name_template {template!r} must use %(uuid)s so that "
            "two instances can never share a domain name"
        )
    if not DOMAIN_NAME_RE.match(name_a):
        raise ValueError(
            f"[compute] instance_name_template {template!r} gives {name_a!r}, which is not "
            "a valid domain name (letters, digits, '.', '_', '-')"
        )


def _read_every_option(conf: cfg.ConfigOpts) -> None:
    for group, opts in list_opts():
        section = conf if group == "DEFAULT" else conf[group]
        for opt in opts:
            getattr(section, opt.dest)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def mutate(conf: cfg.ConfigOpts) -> None:
    """SIGHUP: re-read the config files and apply the mutable options, all or none.

    oslo.config takes a new value of a mutable option without checking it:
    after ``debug = maybe`` every read of ``debug`` raised, the reload died
    with a traceback on stderr and the log said nothing. A file that does not
    parse, or a mutable option with a bad value, now leaves the options in
    force as they were; ValueError says why in one line.
    """
    before = getattr(conf, "_mutable_ns", None)
    try:
        conf.mutate_config_files()
    except cfg.Error as exc:
        raise ValueError(_one_line(str(exc))) from None
    try:
        for group, opts in list_opts():
            section = conf if group == "DEFAULT" else conf[group]
            for opt in opts:
                if opt.mutable:
                    getattr(section, opt.dest)
    except (cfg.Error, ValueError) as exc:
        conf._mutable_ns = before  # back to the values read at start or the last reload
        conf.register_opts([])  # registering clears oslo.config's cache of values read
        raise ValueError(_one_line(str(exc))) from None
