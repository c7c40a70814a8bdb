"""Logging set-up: one readable format, greenthread names, secrets masked.

The agent's log lines are written by a native thread, never on the hub: a
write to stderr blocks while its reader (journald, a pipe) is slow, and one
such write held the whole agent for 0.3-1.7 s during a sync that logged
3000 changes.
"""

from __future__ import annotations

import logging
import logging.handlers
import re
import sys
import urllib.parse

from oslo_config import cfg

from compute_agent.utils import URL_CREDENTIALS, mask_url_password

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
        for match in URL_CREDENTIALS.finditer(url or ""):
            raw = match.group("pw")
            plain = urllib.parse.unquote(raw)
            for form in {raw, plain, urllib.parse.quote(plain, safe=""), urllib.parse.quote(plain)}:
                if len(form) >= MIN_SECRET:
                    _PASSWORDS.add(form)
                _PASSWORDS.update(p for p in _DELIMITERS.split(form) if len(p) >= MIN_PIECE)


def mask_secrets(text: str) -> str:
    """Replace the password of every URL in ``text``, and every known password, with ``***``."""
    text = mask_url_password(text)
    for secret in sorted(_PASSWORDS, key=len, reverse=True):
        if secret in text:
            text = text.replace(secret, "***")
    return text


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        if not hasattr(record, "green"):
            from compute_agent import green  # here: a client importing log loads no eventlet

            record.green = green.current_name()
        return mask_secrets(super().format(record))


class BackgroundHandler(logging.Handler):
    """Hands records to a native writer thread; the caller never waits on I/O.

    The record is completed where it is made (message merged with its
    arguments, traceback rendered, greenthread name taken), so the writer
    needs nothing of the caller. At most ``limit`` records wait: past that
    they are dropped and counted, and the writer says how many it dropped
    as soon as it catches up, in one line.
    """

    def __init__(self, target: logging.Handler, limit: int = 20_000) -> None:
        super().__init__()
        self.target = target
        self.limit = limit
        self.dropped = 0
        from compute_agent import green  # here: a client importing log loads no eventlet

        self._dropped_guard = green.native_lock()  # any thread logs
        self._pending = green.native_queue()
        self._writer = green.native_thread(self._write_loop, name="log-writer")

    def emit(self, record: logging.LogRecord) -> None:
        if self._pending.qsize() >= self.limit:
            with self._dropped_guard:
                self.dropped += 1
            return
        try:
            from compute_agent import green  # loaded by __init__

            record.green = green.current_name()
            record.msg, record.args = record.getMessage(), None
            if record.exc_info:
                record.exc_text = _plain.formatException(record.exc_info)
                record.exc_info = None
        except Exception:  # noqa: BLE001 - as logging does for a bad record
            self.handleError(record)
            return
        self._pending.put(record)

    def reopen(self) -> None:
        """Have the writer reopen the target's file after what is queued before."""
        self._pending.put(_REOPEN)

    def _write_loop(self) -> None:
        """Write what is queued, a batch at a time: a sync that logs thousands of
        changes would otherwise pay a write and a flush per line."""
        reported = 0
        while True:
            items = [self._pending.get()]
            # The only reader: what is not empty now is there to take.
            while len(items) < WRITE_BATCH and not self._pending.empty():
                items.append(self._pending.get())
            records: list[logging.LogRecord] = []
            for item in items:
                if item is None:
                    self._write(records)
                    return
                if item is _REOPEN:
                    self._write(records)
                    records = []
                    reopen_handler(self.target)
                    continue
                records.append(item)
            if self.dropped > reported and self._pending.qsize() == 0:
                lost, reported = self.dropped - reported, self.dropped
                records.append(_dropped_record(lost, self.limit))
            self._write(records)

    def _write(self, records: list[logging.LogRecord]) -> None:
        """One write and one flush for a plain stream or file target; else one by one."""
        target = self.target
        stream = getattr(target, "stream", None)
        if type(target) not in _STREAM_HANDLERS or stream is None or len(records) < 2:
            for record in records:
                target.handle(record)
            return
        assert isinstance(target, logging.StreamHandler)
        try:
            text = "".join(
                target.format(r) + target.terminator
                for r in records
                if r.levelno >= target.level and target.filter(r)
            )
            target.acquire()
            try:
                if isinstance(target, logging.handlers.WatchedFileHandler):
                    target.reopenIfNeeded()  # the file moved (logrotate without SIGHUP)
                target.stream.write(text)
                target.flush()
            finally:
                target.release()
        except Exception:  # noqa: BLE001 - as logging does: report, never raise
            target.handleError(records[-1])

    def flush(self) -> None:
        """Nothing to do here: the writer flushes each record as it writes it.

        Flushing the target from here took the target's lock, which the
        writer thread holds while it writes; taken from a greenthread (the
        lock is green once eventlet patches threading), the wait was never
        woken, and an agent hung at exit in logging's shutdown.
        """

    def close(self) -> None:
        """Write what is queued (for at most a few seconds), then close the target."""
        if self._writer.is_alive():
            self._pending.put(None)
            self._writer.join(5)
        if not self._writer.is_alive():  # else it still holds the target: leave it
            self.target.close()
        super().close()


_plain = logging.Formatter()
# Records a writer takes off its queue at most, to write with one flush.
WRITE_BATCH = 256
# Targets whose emit is "format, write, flush" and nothing more (bar the
# watched file's reopen check): their records can share a write.
_STREAM_HANDLERS = (
    logging.StreamHandler,
    logging.FileHandler,
    logging.handlers.WatchedFileHandler,
)
# Queued to a BackgroundHandler: "reopen the file here", in order with the records.
_REOPEN = object()


def reopen_handler(handler: logging.Handler) -> None:
    """Close and reopen ``handler``'s file, if it writes one (logrotate, SIGHUP)."""
    if not isinstance(handler, logging.FileHandler):
        return
    handler.acquire()
    try:
        if handler.stream is not None:
            handler.stream.close()
        handler.stream = handler._open()
        if isinstance(handler, logging.handlers.WatchedFileHandler):
            handler._statstream()
    except OSError as exc:
        # Keep logging somewhere: a directory made unwritable must not
        # silence the agent. The next record retries the open.
        handler.stream = None
        print(f"compute-agent: cannot reopen {handler.baseFilename}: {exc}", file=sys.stderr)
    finally:
        handler.release()


def close() -> None:
    """Write out and close the root logger's handlers, before the process leaves."""
    for handler in list(logging.getLogger().handlers):
        handler.close()


def reopen() -> None:
    """Reopen the log file (on SIGHUP): lines from now on go to the file at its path."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, BackgroundHandler):
            handler.reopen()
        else:
            reopen_handler(handler)


def _dropped_record(count: int, limit: int) -> logging.LogRecord:
    record = logging.LogRecord(
        __name__,
        logging.WARNING,
        __file__,
        0,
        "dropped %d log records: more than %d were waiting to be written",
        (count, limit),
        None,
    )
    record.green = "log-writer"
    return record


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
# syslog and journald stamp the time and the program themselves.
SYSLOG_FORMAT = "compute-agent[%(process)d]: %(levelname)s %(name)s [%(green)s] %(message)s"
SYSLOG_ADDRESS = "/dev/log"


def make_handler(
    log_file: str | None, *, use_syslog: bool = False, facility: str = "daemon"
) -> logging.Handler:
    """The handler of syslog, ``log_file``, or stderr.

    A request may carry any text, lone surrogates included, and the agent
    logs parts of it: the file escapes what UTF-8 cannot hold, as stderr
    does, rather than lose the line to a logging error. The file is
    watched: renamed or removed by logrotate, it is reopened at its path
    before the next line is written (SIGHUP reopens it too).
    """
    handler: logging.Handler
    if use_syslog:
        handler = logging.handlers.SysLogHandler(
            address=SYSLOG_ADDRESS,
            facility=logging.handlers.SysLogHandler.facility_names[facility],
        )
        handler.setFormatter(_Formatter(SYSLOG_FORMAT))
        return handler
    if log_file:
        handler = logging.handlers.WatchedFileHandler(
            log_file, encoding="utf-8", errors="backslashreplace"
        )
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter(FORMAT))
    return handler


def set_level(debug: bool) -> None:
    """DEBUG or INFO for the agent; WARNING at least for libraries chatty at INFO."""
    level = logging.DEBUG if debug else logging.INFO
    logging.getLogger().setLevel(level)
    for name in ("alembic.runtime.migration", "oslo_messaging", "amqp", "kombu"):
        logging.getLogger(name).setLevel(max(level, logging.WARNING))


def setup(
    conf: cfg.ConfigOpts | None = None, *, debug: bool = False, background: bool = False
) -> None:
    """Log to the configured file or stderr; ``background``: through a writer thread."""
    if conf is not None:
        register_secret_urls(conf.transport_url, conf.database.connection)
        handler = make_handler(
            conf.log_file, use_syslog=conf.use_syslog, facility=conf.syslog_log_facility
        )
    else:
        handler = make_handler(None)
    if background:
        handler = BackgroundHandler(handler)
    # On the handler: a logger's own filters do not see its children's records.
    handler.addFilter(_DEAD_CLOSE)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        if isinstance(old, BackgroundHandler):
            old.close()
    root.addHandler(handler)
    set_level(debug or (conf is not None and conf.debug))
    logging.captureWarnings(True)
    # The formats name no source file, line, function or thread: logging need
    # not walk the caller's stack nor look up the thread for every record (the
    # logging documentation's "Optimization"; a sync may log 10,000 changes).
    logging._srcfile = None
    logging.logThreads = False


_DEAD_CLOSE = _DeadConnectionClose()
