"""Typed errors, in one tree of five categories, and their one mapping to the wire.

::

    ComputeAgentError
    ├── InvalidInput                 input: the request itself is wrong; do not retry it as is
    ├── StateError                   state: the request does not fit what is there now
    │   ├── InstanceNotFound
    │   ├── InstanceInvalidState
    │   │   └── InstanceExists
    │   ├── ForeignDomain            a domain of the instance's name is another's: never touched
    │   └── ServiceRowError          the host's service row is not this agent's to use
    │       ├── ServiceNotFound
    │       ├── ServiceOwned
    │       └── OwnershipLost
    ├── Unavailable                  this host cannot serve now; retry later
    │   ├── HypervisorUnavailable    hypervisor
    │   └── DatabaseUnavailable      database
    │       └── DatabaseBusy         refused for load (too many clients): wait, retry
    └── Stopping                     stopping: the agent, or the task asked, is stopping
        └── TaskStopped

The categories are the agent's own; a caller over RPC only ever sees the
four :data:`PUBLIC_ERRORS`, chosen by :func:`public_error` at the front
door (``docs/rpc.md``, "Errors"); the admin socket, local and read by an
operator, reports the precise class (:func:`operator_error`). Code that
must tell a hypervisor outage from a database one catches the leaf; code
that only needs "cannot serve now" catches :class:`Unavailable`.
"""

from __future__ import annotations


class ComputeAgentError(Exception):
    """Base of every error the agent reports to a caller."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


# -- input ----------------------------------------------------------------


class InvalidInput(ComputeAgentError):
    """A request, argument or field failed validation."""


# -- state ----------------------------------------------------------------


class StateError(ComputeAgentError):
    """What is asked does not fit what is there now (missing, busy, someone else's)."""


class InstanceNotFound(StateError):
    def __init__(self, uuid: str, detail: str = "") -> None:
        super().__init__(f"instance {uuid} not found" + (f": {detail}" if detail else ""))
        self.uuid = uuid
        # What oslo.messaging sends, and rebuilds the error from on the caller's side.
        self.args = (uuid, detail)


class InstanceInvalidState(StateError):
    """An operation was asked of an instance whose state does not allow it."""


class InstanceExists(InstanceInvalidState):
    """A build for a UUID that already has an instance."""


class ForeignDomain(StateError):
    """A domain has the instance's name but another UUID: never ours to touch.

    Not an InstanceInvalidState, so the jobs that skip a busy instance do not
    skip this one silently; callers see it as one (see :func:`public_error`).
    """


class ServiceRowError(StateError):
    """The host's service row cannot be used by this agent (gone, or another's)."""


class ServiceNotFound(ServiceRowError):
    """The service row this agent wrote to is gone."""


class ServiceOwned(ServiceRowError):
    """The host's service row belongs to another live agent: this one must not start."""


class OwnershipLost(ServiceRowError):
    """Another agent took this host's service row while this one ran: it must stop writing."""


# -- hypervisor, database -------------------------------------------------


class Unavailable(ComputeAgentError):
    """Something this host needs cannot be reached now; the request may be retried later.

    ``what`` names it: :meth:`described` puts it before a message that does
    not already start with it, so a report names the real cause once.
    """

    what = "unavailable"

    def described(self) -> str:
        """The message, starting with what is unavailable ("database unavailable: ...")."""
        if self.message.startswith(self.what):
            return self.message
        return f"{self.what}: {self.message}"


class HypervisorUnavailable(Unavailable):
    """The hypervisor cannot be reached now; the request may be retried later."""

    what = "hypervisor unavailable"


class DatabaseUnavailable(Unavailable):
    """This host cannot reach its database now; the request may be retried later.

    Not a HypervisorUnavailable: an outage of the database must not be
    taken for one of the hypervisor (say, to disable the service). RPC
    callers still receive it as HypervisorUnavailable (:func:`public_error`).
    """

    what = "database unavailable"


class DatabaseBusy(DatabaseUnavailable):
    """The database (or its pooler) refused a connection for load: too many clients.

    The one outage a short wait cures by itself: the agent retries at start
    and the heartbeat retries before its next run, where any other outage
    fails at once.
    """


# -- stopping -------------------------------------------------------------


class Stopping(ComputeAgentError):
    """The agent, or the part of it a request waited on, is stopping; the request is not done."""


class TaskStopped(Stopping):
    """The periodic task was stopped before the requested run could happen."""


# -- the wire -------------------------------------------------------------

# The only error types an RPC caller ever receives, most specific first.
PUBLIC_ERRORS: tuple[type[ComputeAgentError], ...] = (
    InstanceNotFound,
    InvalidInput,
    InstanceInvalidState,
    HypervisorUnavailable,
)

# Refusals in the normal course of things: a front door logs no traceback for them.
EXPECTED: tuple[type[ComputeAgentError], ...] = (
    InvalidInput,
    InstanceNotFound,
    InstanceInvalidState,
    ForeignDomain,
    Unavailable,
    Stopping,
)


def public_error(exc: BaseException, host: str, method: str) -> ComputeAgentError:
    """``exc`` as one of the four :data:`PUBLIC_ERRORS`, its message naming the real cause.

    input -> InvalidInput; state -> InstanceNotFound or InstanceInvalidState
    (a ForeignDomain too); hypervisor and database -> HypervisorUnavailable
    ("this host cannot serve now, retry"), the message saying which;
    stopping -> HypervisorUnavailable "host H is stopping: ...". Anything
    else (a service-row error, a bug) -> HypervisorUnavailable naming the
    method, the host and the error's class. A public type is passed as is.
    """
    if type(exc) in PUBLIC_ERRORS:
        assert isinstance(exc, ComputeAgentError)
        return exc
    if isinstance(exc, InstanceInvalidState | ForeignDomain):
        return InstanceInvalidState(str(exc))
    if isinstance(exc, InvalidInput):
        return InvalidInput(str(exc))
    if isinstance(exc, InstanceNotFound):
        return InstanceNotFound(*exc.args)
    if isinstance(exc, HypervisorUnavailable):
        return HypervisorUnavailable(str(exc))
    if isinstance(exc, Unavailable):
        return HypervisorUnavailable(exc.described())
    if isinstance(exc, Stopping):
        return HypervisorUnavailable(f"host {host} is stopping: {exc}")
    detail = str(exc).splitlines()[0][:300] if str(exc) else ""
    return HypervisorUnavailable(
        f"{method} failed on host {host}: {type(exc).__name__}" + (f": {detail}" if detail else "")
    )


def operator_error(exc: BaseException) -> tuple[str, str]:
    """The admin socket's ``(type, message)`` for ``exc``: its own class, its cause named.

    The CLI prints both, so an operator reads ``DatabaseUnavailable:
    database unavailable: ...`` where an RPC caller reads HypervisorUnavailable.
    """
    if isinstance(exc, Unavailable):
        message = exc.described()
    elif isinstance(exc, ComputeAgentError):
        message = exc.message
    else:
        message = str(exc)
    return type(exc).__name__, message or type(exc).__name__
