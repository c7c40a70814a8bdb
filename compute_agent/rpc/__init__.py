"""The agent's RPC interface over oslo.messaging: constants shared by server and client.

The interface is public and documented in ``docs/rpc.md``. Version 1.x only
ever grows: a new method or a new optional argument raises the minor
version; nothing is removed or changed in meaning without a 2.0.
"""

from __future__ import annotations

from compute_agent import exception

# The ``binary`` of the agent's service rows; the client finds hosts by it.
BINARY = "compute-agent"
TOPIC = "compute"
VERSION = "1.0"

# The module whose exceptions a caller may have rebuilt as real classes.
EXCEPTION_MODULE = exception.__name__

# The only error types a caller ever receives, most specific first
# (``exception.public_error`` maps every other error to one of them).
PUBLIC_ERRORS = exception.PUBLIC_ERRORS
