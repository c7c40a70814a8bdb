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
            vcpus=1,
            memory_mb=64,
        ),
        source="rpc",
        reason="test",
    )


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
