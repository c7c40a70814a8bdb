"""Small helpers with no better home."""

from __future__ import annotations

import datetime as dt
import gc
import math
import re
import uuid as uuidlib
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any, TypeGuard

from compute_agent import exception

# Every URL-like token (transport_url, database connection), and in it each
# user:password@ -- a transport_url may list several hosts, comma-separated,
# each with its own credentials.
_URL = re.compile(r"[a-zA-Z][a-zA-Z0-9+.\-]*://[^\s'\"]+")
URL_CREDENTIALS = re.compile(r"(?P<head>(?:://|,)[^:/@,\s]*:)(?P<pw>[^@\s]+?)(?=@)")


def utcnow() -> dt.datetime:
    """Naive UTC time, the form every timestamp column stores."""
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


def printable(value: object, limit: int = 80) -> str:
    """``value`` as text cut to ``limit`` characters, anything unprintable escaped.

    Names a client chose (methods, arguments, fields) go into error messages
    and log lines; escaped, they can neither break a line in two nor carry a
    character (a lone surrogate) that a log file cannot encode.
    """
    try:
        text = str(value)[:limit]
    except ValueError:  # an int too long to convert (Python's digit limit)
        text = f"<{type(value).__name__} too long to show>"
    return text if text.isprintable() else repr(text)[1:-1]


def mask_url_password(text: str) -> str:
    """``text`` with the password of every URL in it (each host's) replaced by ``***``.

    The one masking of URL credentials: logs, error messages and CLI output
    all go through it (``log.mask_secrets`` adds the known passwords).
    """
    return _URL.sub(lambda m: URL_CREDENTIALS.sub(r"\g<head>***", m.group(0)), text)


def request_args(method: object, args: Any, what: str = "arguments") -> dict[str, Any]:
    """A request's arguments: None (no arguments) as ``{}``, else an object of named values.

    The one reading of a request's ``args``, for RPC, the admin socket and
    the dispatcher alike; ``what`` is the field's name in the caller's protocol.
    """
    if args is None:
        return {}
    if not isinstance(args, dict) or not all(isinstance(k, str) for k in args):
        raise exception.InvalidInput(
            f"{printable(method)}: {what} must be an object of named values"
        )
    return args


def is_uuid(value: object) -> TypeGuard[str]:
    """True for a canonical (hyphenated, any case) UUID string."""
    if not isinstance(value, str) or len(value) != 36:
        return False
    try:
        return str(uuidlib.UUID(value)) == value.lower()
    except ValueError:
        return False


def freeze_long_lived_objects() -> None:
    """Keep what start-up created out of every later garbage collection.

    A full collection walks every tracked object, and start-up leaves a few
    hundred thousand (modules, oslo, SQLAlchemy, the driver): a full
    collection during a large sync held the hub for 65-135 ms. Frozen, they
    are never walked again; only objects made since are. No collection runs
    first: one over the whole start-up heap is itself a 100 ms stall, and
    the little garbage start-up leaves is kept instead. Called again once
    the RPC server serves: its driver (kombu, amqp) is imported only then.
    """
    gc.freeze()


def percentile(values: Sequence[float], q: float) -> float:
    """The nearest-rank ``q`` quantile of ``values`` (0.5: median; 0.0 when empty).

    The one the agent's figures and the benchmarks report: a value that was
    measured, never one interpolated between two.
    """
    ordered = sorted(values)
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def add_counts(lock: AbstractContextManager[Any], target: object, **deltas: int) -> None:
    """Add ``deltas`` to ``target``'s counters under ``lock``.

    Counters changed by several tasks: under the threads backend a ``+=``
    there is a read-modify-write another thread can interleave.
    """
    with lock:
        for name, delta in deltas.items():
            setattr(target, name, getattr(target, name) + delta)
