"""Small helpers with no better home."""

from __future__ import annotations

import datetime as dt
import uuid as uuidlib


def utcnow() -> dt.datetime:
    """Naive UTC time, the form every timestamp column stores."""
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


def is_uuid(value: object) -> bool:
    """True for a canonical (hyphenated, any case) UUID string."""
    if not isinstance(value, str) or len(value) != 36:
        return False
    try:
        return str(uuidlib.UUID(value)) == value.lower()
    except ValueError:
        return False
