"""Logging set-up: one readable format, greenthread names, secrets masked."""

from __future__ import annotations

import logging
import re
import sys
import urllib.parse

from oslo_config import cfg

from compute_agent import green

# Every URL-like token (transport_url, database connection), and in it each
# user:password@ -- a transport_url may list several hosts, comma-separated,
# each with its own credentials.
_URL = re.compile(r"[a-zA-Z][a-zA-Z0-9+.\-]*://[^\s'\"]+")
_CREDENTIALS = re.compile(r"(?P<head>(?:://|,)[^:/@,\s]*:)(?P<pw>[^@\s]+?)(?=@)")


# The configured passwords themselves, masked wherever they appear: a
# library may put one in a message that is no URL (kombu's URL parser,
# given a password holding '/', raises "Port could not be cast to integer
# value as '<password up to the slash>'").
_PASSWORDS: set[str] = set()
# A URL parser cuts a password at these; each piece this long is masked too.
# Shorter values are left to the URL masking: a password like "guest" is a
# common word, and masking it everywhere garbles paths and host names.
_DELIMITERS = re.compile(r"[/?#@:;,\[\]]")
MIN_SECRET = 6
MIN_PIECE = 6


def register_secret_urls(*urls: str | None) -> None:
    """Remember the passwords of ``urls`` (raw, unquoted, quoted), so ``mask_secrets``
    hides them even outside a URL, in whole or in the pieces a parser leaves."""
    for url in urls:
        for match in _CREDENTIALS.finditer(url or ""):
            raw = match.group("pw")
            plain = urllib.parse.unquote(raw)
            for form in {raw, plain, urllib.parse.quote(plain, safe=""), urllib.parse.quote(plain)}:
                if len(form) >= MIN_SECRET:
                    _PASSWORDS.add(form)
                _PASSWORDS.update(p for p in _DELIMITERS.split(form) if len(p) >= MIN_PIECE)


def mask_secrets(text: str) -> str:
    """Replace the password of every URL in ``text``, and every known password, with ``***``."""
    text = _URL.sub(lambda m: _CREDENTIALS.sub(r"\g<head>***", m.group(0)), text)
    for secret in sorted(_PASSWORDS, key=len, reverse=True):
        if secret in text:
            text = text.replace(secret, "***")
    return text


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        record.green = green.current_name()
        return mask_secrets(super().format(record))


class _DeadConnectionClose(logging.Filter):
    """SQLAlchemy's pool failing to close a connection the server already dropped.

    After a database restart the pool's pre-ping finds each pooled
    connection dead and discards it; closing its socket then fails, and the
    pool logs that at ERROR with two tracebacks per connection. Nothing is
    wrong by then: keep one DEBUG line.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("sqlalchemy.pool") and record.getMessage().startswith(
            "Exception terminating connection"
        ):
            exc = record.exc_info[1] if record.exc_info else None
            record.msg = "discarded a dead database connection (%s)"
            record.args = (f"{type(exc).__name__}: {exc}" if exc else "closed",)
            record.exc_info = record.exc_text = None
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger().isEnabledFor(logging.DEBUG)
        return True


FORMAT = "%(asctime)s %(levelname)-7s %(name)s [%(green)s] %(message)s"


def make_handler(log_file: str | None) -> logging.Handler:
    """The handler of ``log_file``, or of stderr.

    A request may carry any text, lone surrogates included, and the agent
    logs parts of it: the file escapes what UTF-8 cannot hold, as stderr
    does, rather than lose the line to a logging error.
    """
    handler: logging.Handler
    if log_file:
        handler = logging.FileHandler(log_file, encoding="utf-8", errors="backslashreplace")
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter(FORMAT))
    return handler


def setup(conf: cfg.ConfigOpts | None = None, *, debug: bool = False) -> None:
    if conf is not None:
        register_secret_urls(conf.transport_url, conf.database.connection)
    handler = make_handler(conf.log_file if conf is not None else None)
    # On the handler: a logger's own filters do not see its children's records.
    handler.addFilter(_DEAD_CLOSE)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    level = logging.DEBUG if (debug or (conf is not None and conf.debug)) else logging.INFO
    root.setLevel(level)
    # Libraries that are chatty at INFO about things an operator need not see.
    for name in ("alembic.runtime.migration", "oslo_messaging", "amqp", "kombu"):
        logging.getLogger(name).setLevel(max(level, logging.WARNING))
    logging.captureWarnings(True)


_DEAD_CLOSE = _DeadConnectionClose()
