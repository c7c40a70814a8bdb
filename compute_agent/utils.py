"""Small helpers with no better home."""

from __future__ import annotations

import datetime as dt
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
