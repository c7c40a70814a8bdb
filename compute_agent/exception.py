"""Typed errors. RPC and the admin CLI report them by class name and message."""

from __future__ import annotations


class ComputeAgentError(Exception):
    """Base of every error the agent reports to a caller."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class InvalidInput(ComputeAgentError):
    """A request, argument or field failed validation."""


class InstanceNotFound(ComputeAgentError):
    def __init__(self, uuid: str, detail: str = "") -> None:
        super().__init__(f"instance {uuid} not found" + (f": {detail}" if detail else ""))
        self.uuid = uuid
        # What oslo.messaging sends, and rebuilds the error from on the caller's side.
        self.args = (uuid, detail)


class InstanceInvalidState(ComputeAgentError):
    """An operation was asked of an instance whose state does not allow it."""


class InstanceExists(InstanceInvalidState):
    """A build for a UUID that already has an instance."""


class HypervisorUnavailable(ComputeAgentError):
    """The hypervisor cannot be reached now; the request may be retried later."""


class DatabaseUnavailable(HypervisorUnavailable):
    """This host cannot reach its database now; the request may be retried later.

    A kind of HypervisorUnavailable so that RPC callers, who know the four
    public types, see "this host cannot serve now, retry" and nothing new.
    """


class ForeignDomain(ComputeAgentError):
    """A domain has the instance's name but another UUID: never ours to touch."""


class ServiceNotFound(ComputeAgentError):
    pass


class ServiceOwned(ComputeAgentError):
    """The host's service row belongs to another live agent: this one must not start."""


class OwnershipLost(ComputeAgentError):
    """Another agent took this host's service row while this one ran: it must stop writing."""
