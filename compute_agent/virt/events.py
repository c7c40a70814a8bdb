"""Lifecycle events: what a hypervisor tells us happened to a domain, unasked."""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field

from compute_agent import green


class Transition(enum.StrEnum):
    """A domain's change of state, as named by the agent (not by libvirt)."""

    STARTED = "started"
    STOPPED = "stopped"
    PAUSED = "paused"
    RESUMED = "resumed"
    SUSPENDED = "suspended"
    CRASHED = "crashed"
    UNDEFINED = "undefined"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class LifecycleEvent:
    """One event. ``received`` is the monotonic time it reached the hub."""

    name: str
    uuid: str
    transition: Transition
    detail: str = ""
    received: float = field(default_factory=green.monotonic)


# Called on the hub, in the driver's dispatcher greenthread: it must not block.
EventListener = Callable[[LifecycleEvent], None]
