"""The admin socket's framing: one JSON object per line, UTF-8, both ways.

A request is ``{"method": str, "args": {...}}``. The agent answers each
with exactly one final line, ``{"ok": true, "result": ...}`` or
``{"ok": false, "error": {"type": ..., "message": ...}}``; a long call may
first send any number of ``{"progress": {"done": n, "total": m}}`` lines.
A connection may carry several requests, one after the other.

Lines, not length prefixes, so that an operator can talk to the socket with
``socat`` when the CLI is not at hand.
"""

from __future__ import annotations

import json
from typing import Any

from compute_agent import exception
from compute_agent.exception import ProtocolError
from compute_agent.utils import printable, request_args

# A request line, its newline included, may not exceed this. Arguments are
# bounded again (smaller) by the dispatcher; this bound only protects the
# reader from a client that never sends a newline.
MAX_REQUEST_BYTES = 256 * 1024


def encode(message: dict[str, Any]) -> bytes:
    """One message as a line; values JSON cannot hold (datetimes) become strings."""
    return json.dumps(message, separators=(",", ":"), default=str).encode("utf-8") + b"\n"


def request(method: str, args: dict[str, Any] | None = None) -> bytes:
    return encode({"method": method, "args": args or {}})


def ok(result: Any) -> dict[str, Any]:
    return {"ok": True, "result": result}


def error(type_: str, message: str) -> dict[str, Any]:
    return {"ok": False, "error": {"type": type_, "message": message}}


def progress(done: int, total: int) -> dict[str, Any]:
    return {"progress": {"done": done, "total": total}}


def parse_request(line: bytes) -> tuple[str, dict[str, Any]]:
    """The method and arguments of one request line; InvalidInput if it is not one.

    Only the envelope is checked here; the dispatcher checks the method and
    the arguments' names, the manager their values.
    """
    if len(line) > MAX_REQUEST_BYTES:
        raise exception.InvalidInput(
            f"request of more than {MAX_REQUEST_BYTES} bytes; the limit is {MAX_REQUEST_BYTES}"
        )
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise exception.InvalidInput(f"request is not UTF-8: {exc.reason}") from None
    try:
        message = json.loads(text)
    except RecursionError:
        raise exception.InvalidInput("request is nested too deeply") from None
    except ValueError as exc:
        raise exception.InvalidInput(f"request is not JSON: {exc}") from None
    if not isinstance(message, dict):
        raise exception.InvalidInput(
            f'request must be a JSON object {{"method": ..., "args": {{...}}}}, '
            f"not {type(message).__name__}"
        )
    unknown = sorted(printable(k, 40) for k in message if k not in ("method", "args"))
    if unknown:
        raise exception.InvalidInput(
            f"request has unknown field(s) {', '.join(unknown[:5])}; it takes method and args"
        )
    method = message.get("method")
    if not isinstance(method, str) or not method:
        raise exception.InvalidInput("request needs a method, a non-empty string")
    return method, request_args(method, message.get("args"), "args")


def parse_reply(line: bytes) -> dict[str, Any]:
    """One line from the agent, checked to be a progress, result or error message."""
    try:
        message = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ProtocolError(f"unreadable reply from the agent: {exc}") from None
    if not isinstance(message, dict):
        raise ProtocolError(f"reply from the agent is a {type(message).__name__}, not an object")
    if "progress" in message:
        prog = message["progress"]
        if not (
            isinstance(prog, dict)
            and isinstance(prog.get("done"), int)
            and isinstance(prog.get("total"), int)
        ):
            raise ProtocolError(f"malformed progress from the agent: {prog!r:.200}")
        return message
    if message.get("ok") is True and "result" in message:
        return message
    err = message.get("error")
    if (
        message.get("ok") is False
        and isinstance(err, dict)
        and isinstance(err.get("type"), str)
        and isinstance(err.get("message"), str)
    ):
        return message
    raise ProtocolError(f"reply from the agent is not a result, error or progress: {line!r:.200}")
