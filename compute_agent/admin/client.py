"""The CLI's side of the admin socket: one connection per call, plain sockets.

Three kinds of failure, because the CLI gives each its own exit status:
:class:`AgentUnreachable` (no agent answers: no socket file, nobody
listening, no answer to the connect in time), :class:`RemoteError` (the
agent answered with a typed error) and :class:`ClientError` (anything
else: no permission on the socket, the agent hung up mid-call, a reply
that is not of this protocol).
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

from compute_agent.admin import protocol

CONNECT_TIMEOUT = 5.0

ProgressCallback = Callable[[int, int], None]


class AgentUnreachable(Exception):
    """No agent answers on the socket."""


class ClientError(Exception):
    """The call could not be made or its reply could not be read."""


class RemoteError(Exception):
    """The agent's typed error: ``type`` is the class name, as in ``exception``."""

    def __init__(self, type_: str, message: str) -> None:
        super().__init__(f"{type_}: {message}")
        self.type = type_
        self.message = message


class AdminClient:
    def __init__(
        self,
        path: str,
        *,
        connect_timeout: float = CONNECT_TIMEOUT,
        reply_timeout: float | None = None,
    ) -> None:
        self.path = path
        self.connect_timeout = connect_timeout
        # None waits as long as the call takes: a sync of thousands of
        # instances or a queued build may rightly take minutes.
        self.reply_timeout = reply_timeout

    def call(
        self,
        method: str,
        args: dict[str, Any] | None = None,
        *,
        on_progress: ProgressCallback | None = None,
    ) -> Any:
        """Make one call and return its result; progress lines go to ``on_progress``."""
        sock = self._connect()
        try:
            try:
                sock.settimeout(self.reply_timeout)
                sock.sendall(protocol.request(method, args))
            except OSError as exc:
                raise ClientError(f"cannot send to the agent on {self.path}: {_why(exc)}") from None
            return self._read_reply(sock, on_progress)
        finally:
            sock.close()

    def _connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.connect_timeout)
        try:
            sock.connect(self.path)
        except (FileNotFoundError, NotADirectoryError):
            sock.close()
            raise AgentUnreachable(
                f"no agent answers on {self.path}: the socket does not exist "
                "(is compute-agent running, with the same config files?)"
            ) from None
        except ConnectionRefusedError:
            sock.close()
            raise AgentUnreachable(
                f"no agent answers on {self.path}: nothing listens on it "
                "(a stale socket; is compute-agent running?)"
            ) from None
        except TimeoutError:
            sock.close()
            raise AgentUnreachable(
                f"no agent answers on {self.path} within {self.connect_timeout:g} s"
            ) from None
        except PermissionError:
            sock.close()
            raise ClientError(
                f"permission denied on {self.path}: run as the agent's user (mode 0600)"
            ) from None
        except OSError as exc:
            sock.close()
            raise AgentUnreachable(f"no agent answers on {self.path}: {_why(exc)}") from None
        return sock

    def _read_reply(self, sock: socket.socket, on_progress: ProgressCallback | None) -> Any:
        reader = sock.makefile("rb")
        try:
            while True:
                try:
                    line = reader.readline()
                except TimeoutError:
                    raise ClientError(
                        f"no reply from the agent within {self.reply_timeout:g} s; "
                        "the operation may still complete"
                    ) from None
                except OSError as exc:
                    raise ClientError(f"connection to the agent lost: {_why(exc)}") from None
                if not line:
                    raise ClientError(
                        "the agent closed the connection before replying (is it stopping?)"
                    )
                try:
                    message = protocol.parse_reply(line)
                except protocol.ProtocolError as exc:
                    raise ClientError(str(exc)) from None
                if "progress" in message:
                    if on_progress is not None:
                        on_progress(message["progress"]["done"], message["progress"]["total"])
                    continue
                if message["ok"]:
                    return message["result"]
                raise RemoteError(message["error"]["type"], message["error"]["message"])
        finally:
            reader.close()


def _why(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__
