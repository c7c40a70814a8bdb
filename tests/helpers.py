"""Small helpers shared by the tests."""

from __future__ import annotations

import time
import uuid as uuidlib
from collections.abc import Callable
from typing import Any

from compute_agent import green


def create_instance(
    db,
    *,
    host: str = "h1",
    uuid: str | None = None,
    name: str | None = None,
    vm_state: str = "active",
    power_state: str = "running",
    task_state: str | None = None,
    vcpus: int = 1,
    memory_mb: int = 64,
):
    """An instance row, named as the default instance_name_template would name it."""
    uid = uuid or str(uuidlib.uuid4())
    return db.instance_create(
        dict(
            uuid=uid,
            host=host,
            domain_name=name or f"instance-{uid}",
            vm_state=vm_state,
            task_state=task_state,
            power_state=power_state,
            vcpus=vcpus,
            memory_mb=memory_mb,
        ),
        source="rpc",
        reason="test",
    )


def bulk_create_instances(db, rows: list[dict[str, Any]]) -> None:
    """Many instance rows in one INSERT (``uuid``, ``host``, states; names by the template)."""
    import sqlalchemy as sa

    from compute_agent.db.models import Instance
    from compute_agent.utils import utcnow

    now = utcnow()
    full = [
        {
            "domain_name": f"instance-{r['uuid']}",
            "task_state": None,
            "created_at": now,
            "updated_at": now,
            "deleted": False,
            "vcpus": 1,
            "memory_mb": 64,
            **r,
        }
        for r in rows
    ]
    with db.engine.begin() as conn:
        conn.execute(sa.insert(Instance), full)


def wait_until(predicate, timeout: float = 5.0) -> bool:
    """Poll ``predicate`` greenly until true or ``timeout``; whether it became true."""
    end = green.monotonic() + timeout
    while green.monotonic() < end:
        if predicate():
            return True
        green.sleep(0.02)
    return False


def eventually(
    check: Callable[[], Any],
    timeout: float,
    what: str,
    *,
    every: float = 0.05,
    detail: Callable[[], Any] | None = None,
    tolerate: tuple[type[BaseException], ...] = (),
) -> Any:
    """Poll ``check`` until it returns something truthy, and return that.

    For tests that watch another process (an agent, a daemon) on the wall
    clock. Exceptions in ``tolerate`` count as "not yet" (polling through an
    outage); after ``timeout`` it fails with the last value, or with what
    ``detail`` says then.
    """
    end = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = check()
        except tolerate as exc:
            last = exc
        else:
            if last:
                return last
        if time.monotonic() >= end:
            said = detail() if detail else last
            raise AssertionError(f"{what}: not so within {timeout} s; last: {said!r}")
        time.sleep(every)


class VirtualClock:
    """A clock the test controls: ``sleep`` moves time on at once (as Trio's autojump).

    For code that takes a clock (``monotonic`` and ``sleep``), so a test of
    what happens after some seconds does not spend them.
    """

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self.slept: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += max(0.0, seconds)


def dead_instance(db, host: str, days_ago: float):
    """An instance of ``host`` soft-deleted ``days_ago`` days ago (as a delete then wrote it)."""
    import datetime as dt

    import sqlalchemy as sa

    from compute_agent.db.models import Instance
    from compute_agent.utils import utcnow

    inst = create_instance(db, host=host)
    db.instance_soft_delete(inst, "rpc", "test")
    with db.engine.begin() as conn:
        conn.execute(
            sa.update(Instance)
            .where(Instance.id == inst.id)
            .values(deleted_at=utcnow() - dt.timedelta(days=days_ago))
        )
    return inst
