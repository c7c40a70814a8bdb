"""Small helpers shared by the tests."""

from __future__ import annotations

import uuid as uuidlib

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
