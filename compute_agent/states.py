"""The state vocabulary shared by the database, the drivers and the RPC API.

Values are lower-case strings, stored as such in the database and sent as
such over RPC, so that a row is readable without a lookup table.
"""

from __future__ import annotations

import enum


class PowerState(enum.StrEnum):
    """What the hypervisor says a domain is doing. Always follows the hypervisor."""

    RUNNING = "running"
    PAUSED = "paused"
    SHUTDOWN = "shutdown"
    CRASHED = "crashed"
    SUSPENDED = "suspended"
    NOSTATE = "nostate"

    def __str__(self) -> str:
        return self.value


class VmState(enum.StrEnum):
    """What the cloud believes the instance should be."""

    BUILDING = "building"
    ACTIVE = "active"
    STOPPED = "stopped"
    PAUSED = "paused"
    SUSPENDED = "suspended"
    ERROR = "error"
    DELETED = "deleted"

    def __str__(self) -> str:
        return self.value


class TaskState(enum.StrEnum):
    """An operation in flight on an instance; NULL in the database when idle."""

    QUEUED = "queued"
    SPAWNING = "spawning"
    POWERING_OFF = "powering-off"
    POWERING_ON = "powering-on"
    REBOOTING = "rebooting"
    DELETING = "deleting"

    def __str__(self) -> str:
        return self.value


class ActionSource(enum.StrEnum):
    """Who asked for a change recorded in ``instance_actions``."""

    SYNC = "sync"
    EVENT = "event"
    RPC = "rpc"
    CLI = "cli"
    STARTUP = "startup"

    def __str__(self) -> str:
        return self.value
