"""Is a host up? Judged the way a scheduler judges it, from the service row alone."""

from __future__ import annotations

import datetime as dt

from compute_agent.db.models import Service
from compute_agent.utils import utcnow


def is_up(service: Service, down_time: float, now: dt.datetime | None = None) -> bool:
    """Up when it has not said it stopped and its heartbeat is recent enough."""
    if service.stopped_at is not None or service.updated_at is None:
        return False
    age = ((now or utcnow()) - service.updated_at).total_seconds()
    return age <= down_time


def describe(
    service: Service, down_time: float, now: dt.datetime | None = None
) -> dict[str, object]:
    """The service row as an operator wants to read it."""
    now = now or utcnow()
    return {
        "host": service.host,
        "binary": service.binary,
        "up": is_up(service, down_time, now),
        "stopped": service.stopped_at is not None,
        "disabled": bool(service.disabled),
        "disabled_reason": service.disabled_reason,
        "last_heartbeat": service.updated_at.isoformat() + "Z" if service.updated_at else None,
        "heartbeat_age_s": (
            round((now - service.updated_at).total_seconds(), 3) if service.updated_at else None
        ),
        "report_count": service.report_count,
    }
