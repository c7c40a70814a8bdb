"""One agent per host: a lock on the state directory, and a token on the service row.

Two agents for one host each believed the host's instances were theirs:
the second one's first sync rewrote every instance of the first, and its
stop marked the first one's host stopped while it still ran. Two guards
now stand before any write:

* the **host lock**, an ``flock`` on ``<state_path>/compute-agent.lock``
  held for the agent's life; the file names the holder (pid and token).
  The kernel drops it when the process dies, however it dies, so a crash
  never leaves it behind (unlike the admin socket file);
* the **owner token** on the service row, written at start and checked by
  every heartbeat: an agent with another ``state_path`` but the same
  database and ``host`` finds the row owned by a live agent and refuses.

A row whose owner stopped (``stopped_at`` set), whose heartbeat is older
than ``service_down_time``, or whose token is one left in our own lock
file (our predecessors on this state directory, dead since we hold its
lock) may be taken over at once: a restart after a crash is not refused.

The file keeps the tokens of predecessors that never claimed the row
after their own (a restart that died with the database down) until a
claim succeeds: naming only the last one, a restart after such a failure
found the row held by a token it no longer knew and was refused.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import uuid
from dataclasses import dataclass

from compute_agent.exception import OwnedElsewhere

LOCK_NAME = "compute-agent.lock"
# Tokens of predecessors kept in the lock file: restarts that all died
# before their claim; a bound so a crash loop cannot grow the file.
KEEP_PREVIOUS = 16


@dataclass(frozen=True)
class Holder:
    """What a lock file says about the agent that wrote it."""

    pid: int | None
    token: str | None
    previous: tuple[str, ...] = ()

    @property
    def tokens(self) -> tuple[str, ...]:
        """Every token this file names: the row may hold any of them."""
        return ((self.token,) if self.token else ()) + self.previous


def new_token() -> str:
    return uuid.uuid4().hex


def _parse(text: str) -> Holder:
    fields = dict(part.split("=", 1) for part in text.split() if "=" in part)
    pid = fields.get("pid", "")
    previous = tuple(t for t in fields.get("previous", "").split(",") if t)
    return Holder(int(pid) if pid.isdigit() else None, fields.get("token") or None, previous)


class HostLock:
    """An exclusive, non-blocking ``flock`` on the state directory's lock file.

    Taken first thing at start, before the database, the broker or libvirt
    are touched. The file is never removed: removing it would let a third
    agent lock a new file while the second still holds the old inode.
    """

    def __init__(self, state_path: str) -> None:
        self.path = os.path.join(state_path, LOCK_NAME)
        self._fd: int | None = None
        self.previous = Holder(None, None)

    def acquire(self) -> Holder:
        """Take the lock; return what the last holder left in the file.

        Raises OwnedElsewhere naming the holder's pid when it is held.
        """
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _parse(_read(fd))
            os.close(fd)
            who = f"pid {holder.pid}" if holder.pid else "another process"
            raise OwnedElsewhere(
                f"another compute-agent ({who}) holds {self.path}: it runs for this "
                "state_path; stop it first"
            ) from None
        except OSError:
            os.close(fd)
            raise
        self._fd = fd
        self.previous = _parse(_read(fd))
        return self.previous

    def record(self, token: str, previous: tuple[str, ...] = ()) -> None:
        """Write our pid and token, so a refused agent can name us and our successor knows us.

        ``previous``: the tokens inherited, kept until our claim succeeds.
        """
        assert self._fd is not None
        kept = tuple(t for t in previous if t != token)[:KEEP_PREVIOUS]
        text = f"pid={os.getpid()} token={token}"
        if kept:
            text += " previous=" + ",".join(kept)
        data = f"{text}\n".encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)
        os.fsync(self._fd)

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)  # closing the last descriptor drops the flock
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None


def _read(fd: int) -> str:
    try:
        return os.pread(fd, 4096, 0).decode("ascii", "replace")
    except OSError:
        return ""
