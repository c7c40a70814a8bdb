"""Typed errors, in one tree of five categories, and their one mapping to the wire.

::

    ComputeAgentError
    ├── InvalidInput                 input: the request itself is wrong; do not retry it as is
    │   ├── ConfigError              the configuration cannot be used (one line for the operator)
    │   │   └── BackendChoiceError   an unknown concurrency backend, or one chosen too late
    │   ├── ColumnError              a CLI ``-c`` column the output does not have (a ValueError too)
    │   └── RequestTimeout           admin socket: a client sent its request too slowly (dropped)
    ├── StateError                   state: the request does not fit what is there now
    │   ├── InstanceNotFound
    │   ├── InstanceInvalidState
    │   │   └── InstanceExists
    │   ├── ForeignDomain            a domain of the instance's name is another's: never touched
    │   ├── ServiceRowError          the host's service row is not this agent's to use
    │   │   ├── ServiceNotFound
    │   │   ├── ServiceOwned
    │   │   └── OwnershipLost
    │   ├── OwnedElsewhere           another agent holds this host's lock file
    │   ├── SchemaError              the database schema is not the one this agent was built for
    │   └── BindError                an address the agent would serve on cannot be taken
    │       ├── AdminSocketError     the admin socket (or another agent answers on it)
    │       └── MetricsBindError     the metrics endpoint's address
    ├── Unavailable                  this host cannot serve now; retry later
    │   ├── HypervisorUnavailable    hypervisor
    │   ├── DatabaseUnavailable      database
    │   │   └── DatabaseBusy         refused for load (too many clients): wait, retry
    │   ├── AgentUnreachable         CLI: no agent answers on the admin socket
    │   │   └── AgentTimeout         it took the connection but did not answer in time
    │   ├── TooManyConnections       admin socket: a connection refused at the limit
    │   └── Evicted                  admin socket: a slow client dropped to make room
    ├── Stopping                     stopping: the agent, or the task asked, is stopping
    │   └── TaskStopped
    └── AdminCallError               CLI: a call on the admin socket failed once connected
        ├── ClientError              the call could not be made or its reply not be read
        ├── ProtocolError            a reply line that is not a message of the protocol
        └── RemoteError              the agent answered with its typed error (``type`` names it)

    Fatal                            an entry point stops: one line on stderr, an exit status
    PolicyGap (a LookupError)        a bug: the sync policy has no rule for an input

The categories are the agent's own; a caller over RPC only ever sees the
four :data:`PUBLIC_ERRORS`, chosen by :func:`public_error` at the front
door (``docs/rpc.md``, "Errors"); the admin socket, local and read by an
operator, reports the precise class (:func:`operator_error`). Code that
must tell a hypervisor outage from a database one catches the leaf; code
that only needs "cannot serve now" catches :class:`Unavailable`.

The admin socket's refusals (RequestTimeout, TooManyConnections, Evicted)
are logged and counted, never raised to a caller. Fatal and PolicyGap stand
outside the tree on purpose: no handler of the agent's errors may take an
entry point's exit or a bug for a refusal.
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


class ConfigError(InvalidInput):
    """The configuration cannot be used; the message is one line for the operator."""


class BackendChoiceError(ConfigError, ValueError):
    """The concurrency backend asked for is unknown or comes too late; one line."""


class ColumnError(InvalidInput, ValueError):
    """A ``-c`` column the output does not have (a usage error)."""


class RequestTimeout(InvalidInput):
    """Logged (counted) for an admin client dropped for sending too slowly."""


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


class OwnedElsewhere(StateError):
    """Another agent holds this host (its lock file); the message names it in one line."""


class SchemaError(StateError):
    """The database schema does not match what this agent was built for."""


class BindError(StateError):
    """An address the agent would serve on cannot be taken; the message is one line."""


class AdminSocketError(BindError):
    """The admin socket cannot be bound: the entry point stops the agent with this one line."""


class MetricsBindError(BindError):
    """The metrics endpoint's address cannot be listened on; the message is one line."""


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


class AgentUnreachable(Unavailable):
    """No agent answers on the admin socket (the CLI's view)."""

    what = "agent unreachable"


class AgentTimeout(AgentUnreachable):
    """The agent took the connection but did not answer before the deadline.

    A stopped (SIGSTOPped, hung) agent: the kernel still accepts connections
    into the listen backlog, so only a deadline tells it from a slow one.
    """


class TooManyConnections(Unavailable):
    """Logged (counted) for an admin connection refused at the limit."""


class Evicted(Unavailable):
    """Logged (counted) for an admin client dropped to make room for a new one."""


# -- stopping -------------------------------------------------------------


class Stopping(ComputeAgentError):
    """The agent, or the part of it a request waited on, is stopping; the request is not done."""


class TaskStopped(Stopping):
    """The periodic task was stopped before the requested run could happen."""


# -- the CLI's call on the admin socket ---------------------------------------


class AdminCallError(ComputeAgentError):
    """A call on the admin socket failed once an agent was reached (the CLI's view)."""


class ClientError(AdminCallError):
    """The call could not be made or its reply could not be read."""


class ProtocolError(AdminCallError):
    """A line from the agent that is not a message of the admin protocol."""


class RemoteError(AdminCallError):
    """The agent's typed error: ``type`` is the class name, as in this module."""

    def __init__(self, type_: str, message: str) -> None:
        super().__init__(message)
        self.type = type_
        self.args = (type_, message)

    def __str__(self) -> str:
        return f"{self.type}: {self.message}"


# -- outside the tree -----------------------------------------------------


class Fatal(Exception):
    """Stop the program with one line on stderr and the given exit status (1: failed)."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


class PolicyGap(LookupError):
    """An input the sync policy table has no rule for: a bug, which the unit tests catch."""


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
