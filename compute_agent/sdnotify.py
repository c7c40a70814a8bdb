"""systemd's notify protocol, written out: READY, STOPPING, STATUS and the watchdog.

A few datagrams on the UNIX socket named by ``$NOTIFY_SOCKET`` (a leading
``@`` means the abstract namespace). With no such variable every call does
nothing, so the agent runs the same outside systemd.

The watchdog pings come from a greenthread on the hub, never from a native
thread: a hub that stops switching (a greenthread that never yields, a
blocking call made on it) stops the pings, and systemd kills and restarts
an agent that serves nobody any more.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Mapping

from compute_agent import green

LOG = logging.getLogger(__name__)


class Notifier:
    """Sends state lines to systemd's notify socket, if there is one."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        self.address: str | None = None
        if address.startswith("@"):
            self.address = "\0" + address[1:]
        elif address.startswith("/"):
            self.address = address
        self.watchdog_interval = _watchdog_interval(env)
        self._sock: socket.socket | None = None
        self._failed = False
        self._last_status = ""

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *lines: str) -> bool:
        """Send ``lines`` as one datagram; never raises, never blocks."""
        if self.address is None:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._sock.setblocking(False)
            self._sock.sendto("\n".join(lines).encode("utf-8", "replace"), self.address)
        except OSError as exc:
            if not self._failed:  # once: a full or missing socket is not worth a line each time
                LOG.warning("cannot notify systemd on %s: %s", self.address.lstrip("\0"), exc)
                self._failed = True
            return False
        self._failed = False
        return True

    def status(self, text: str) -> bool:
        """Send ``STATUS=text`` if it differs from the last one sent."""
        text = " ".join(text.split())
        if text == self._last_status:
            return False
        self._last_status = text
        return self.send(f"STATUS={text}")

    def ready(self, status: str) -> bool:
        self._last_status = " ".join(status.split())
        return self.send("READY=1", f"STATUS={self._last_status}", f"MAINPID={os.getpid()}")

    def stopping(self, status: str) -> bool:
        self._last_status = " ".join(status.split())
        return self.send("STOPPING=1", f"STATUS={self._last_status}")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _watchdog_interval(env: Mapping[str, str]) -> float | None:
    """Half of ``WATCHDOG_USEC`` in seconds, when the watchdog is meant for this process."""
    usec = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid != str(os.getpid()):
        return None
    return int(usec) / 2 / 1e6


class NotifyLoop:
    """A greenthread that pings the watchdog and refreshes STATUS.

    Every ``interval`` (half the watchdog timeout when there is one, else
    ``status_interval``) it sends ``WATCHDOG=1`` if systemd asked for it,
    and the line ``status`` returns if it changed.
    """

    def __init__(
        self, notifier: Notifier, status: Callable[[], str], status_interval: float
    ) -> None:
        self.notifier = notifier
        self.status = status
        self.interval = notifier.watchdog_interval or status_interval
        self._thread: green.Task | None = None

    def start(self) -> None:
        if not self.notifier.enabled:
            return
        if self.notifier.watchdog_interval:
            LOG.info("systemd watchdog: pinging every %.1f s", self.notifier.watchdog_interval)
        self._thread = green.spawn(self._loop, name="sd-notify")

    def _loop(self) -> None:
        while True:
            if self.notifier.watchdog_interval:
                self.notifier.send("WATCHDOG=1")
            try:
                self.notifier.status(self.status())
            except Exception:  # the pings must go on
                LOG.exception("cannot build the systemd status line")
            green.sleep(self.interval)

    def stop(self) -> None:
        if self._thread is not None:
            self._thread.cancel()
            self._thread = None
