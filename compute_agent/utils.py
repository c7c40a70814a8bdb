"""Small helpers with no better home."""

from __future__ import annotations

import datetime as dt
import gc
import uuid as uuidlib


def utcnow() -> dt.datetime:
    """Naive UTC time, the form every timestamp column stores."""
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


def printable(value: object, limit: int = 80) -> str:
    """``value`` as text cut to ``limit`` characters, anything unprintable escaped.

    Names a client chose (methods, arguments, fields) go into error messages
    and log lines; escaped, they can neither break a line in two nor carry a
    character (a lone surrogate) that a log file cannot encode.
    """
    text = str(value)[:limit]
    return text if text.isprintable() else repr(text)[1:-1]


def is_uuid(value: object) -> bool:
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
