"""A libvirtd frozen, thawed, killed and restarted under a busy agent.

The agent runs as a process on a private libvirtd (a session daemon run as
``nobody`` on a socket in a temporary directory, the test driver behind it,
never the host's daemon), with a short keepalive so that a freeze outlives
it in seconds. While it works (statistics every second, a power sync every
two, admin clients calling ``status``, ``ping`` and instance statistics, a
scraper on /metrics), the daemon is stopped with SIGSTOP and continued,
shortly or past the keepalive, or killed and started again. After each
cycle the agent must be alive, connected again, its events registered
again (an out-of-band pause reaches it) and a forced sync must check every
instance.

Used by ``tests/functional/test_libvirt_freeze.py`` (a few cycles on each
backend) and ``python -m bench.libvirt_thaw_drill agent`` (the long drill).
"""

from __future__ import annotations

import os
import pathlib
import signal
import socket
import subprocess
import threading
import time
import uuid as uuidlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import libvirt

from compute_agent.admin.client import AdminClient
from tests.functional.agent_process import REPO, AgentProcess, free_port, manage

KEEPALIVE = (1, 3)  # interval, count: a freeze is noticed after about 4 s


def private_libvirtd(root: pathlib.Path) -> tuple[subprocess.Popen[bytes], str]:
    """A session libvirtd as ``nobody`` under ``root``: (its process, a test-driver URI)."""
    root.mkdir(exist_ok=True)
    root.chmod(0o777)
    root.parent.chmod(0o755)
    (root / "libvirt" / "libvirt-sock").unlink(missing_ok=True)  # a killed one's
    env = {"PATH": os.environ["PATH"], "HOME": str(root), "XDG_RUNTIME_DIR": str(root),
           "XDG_CONFIG_HOME": f"{root}/cfg", "XDG_CACHE_HOME": f"{root}/cache"}  # fmt: skip
    daemon = subprocess.Popen(
        ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "libvirtd"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=root,
    )  # fmt: skip
    sock = root / "libvirt" / "libvirt-sock"
    end = time.monotonic() + 30
    while not sock.exists() and time.monotonic() < end:
        time.sleep(0.1)
    assert sock.exists(), "the private libvirtd did not start"
    return daemon, f"test+unix:///default?socket={sock}"


@dataclass
class Cycle:
    """One fault and what the agent did after it."""

    kind: str  # "freeze", "short freeze" or "kill"
    held_s: float  # how long the daemon stayed frozen or dead
    alive: bool = False
    back_s: float | None = None  # from thaw or restart to connected and a full sync
    lost_seen: bool = False  # the agent reported the connection down meanwhile
    disabled_seen: bool = False  # and its service disabled (AUTO:) meanwhile
    enabled_after: bool = False  # the service enabled again once back
    events_back: bool = False  # an out-of-band pause reached the agent afterwards
    checked: int = 0  # instances the forced sync after it checked


@dataclass
class Load:
    """The admin clients' and the scraper's calls while the drill runs."""

    ok: Counter[str] = field(default_factory=Counter)
    failed: Counter[str] = field(default_factory=Counter)
    slowest_s: float = 0.0


class Drill:
    """One agent, one private libvirtd, ``instances`` instances."""

    def __init__(
        self,
        root: pathlib.Path,
        backend: str,
        instances: int = 40,
        keepalive: tuple[int, int] = KEEPALIVE,
    ) -> None:
        self.root = root
        self.keepalive = keepalive
        self.backend = backend
        self.instances = instances
        self.daemon: subprocess.Popen[bytes] | None = None
        self.uri = ""
        self.agent: AgentProcess | None = None
        self.admin: AdminClient | None = None
        self.port = 0
        self.xml: list[str] = []
        self.names: list[str] = []
        self.config_files: list[pathlib.Path] = []
        self.load = Load()
        self._keeper: Any = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    # -- set-up and tear-down --------------------------------------------------

    def start(self) -> None:
        self.daemon, self.uri = private_libvirtd(self.root / "lv")
        self._keep()
        conf = self.root / "drill.conf"
        interval, count = self.keepalive
        conf.write_text(
            f"[DEFAULT]\nstate_path = {self.root}/state\nhost = drill-host\nreport_interval = 2\n"
            "[compute]\nstats_interval = 1\nsync_power_state_interval = 2\n"
            f"[libvirt]\nconnection_uri = {self.uri}\nkeepalive_interval = {interval}\n"
            f"keepalive_count = {count}\nreconnect_min_delay = 0.5\nreconnect_max_delay = 2\n"
            "lifecycle_event_delay = 1\n"
        )
        files = self.config_files = [REPO / "etc" / "compute-agent.conf", conf]
        done = manage("db", "sync", config_files=files)
        assert done.returncode == 0, done.stderr
        self.port = free_port()
        env = {"COMPUTE_AGENT_CONCURRENCY": self.backend, "PYTHONFAULTHANDLER": "1"}
        self.agent = AgentProcess(files, extra_env=env, metrics_port=self.port)
        self.agent.wait_for("heartbeat 1", 60)
        self.admin = AdminClient(str(self.root / "state" / "admin.sock"), timeout=60)
        for i in range(self.instances):
            self.admin.call(
                "build_instance",
                {"instance": {"uuid": str(uuidlib.uuid4()), "name": f"drill-{i}",
                              "vcpus": 1, "memory_mb": 64}},
            )  # fmt: skip
        ours = [d for d in self._keeper.listAllDomains(0) if d.name() != "test"]
        self.names = [d.name() for d in ours]
        self.xml = [d.XMLDesc(0) for d in ours]
        assert len(self.xml) == self.instances

    def stop(self) -> int | None:
        """End the load, the agent (SIGTERM) and the daemon; the agent's exit status."""
        self._stop.set()
        for thread in self._threads:
            thread.join(30)
        rc = None
        if self.agent is not None and self.agent.proc.poll() is None:
            try:
                rc, _ = self.agent.terminate(timeout=30)
            except subprocess.TimeoutExpired:
                self.agent.kill()
        elif self.agent is not None:
            rc = self.agent.proc.returncode
        if self.daemon is not None:
            self.daemon.send_signal(signal.SIGCONT)
            self.daemon.kill()
            self.daemon.wait(10)
        return rc

    # -- the load --------------------------------------------------------------

    def start_load(self, clients: int = 3) -> None:
        socket_path = str(self.root / "state" / "admin.sock")
        uuids = [i["uuid"] for i in self._admin().call("list_instances")]
        for n in range(clients):
            client = AdminClient(socket_path, timeout=60)
            self._spawn(self._client_loop, client, uuids[n % len(uuids)])
        self._spawn(self._scrape_loop)

    def _spawn(self, fn: Any, *args: Any) -> None:
        thread = threading.Thread(target=fn, args=args, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _timed(self, what: str, fn: Any, *args: Any) -> None:
        t0 = time.monotonic()
        try:
            fn(*args)
            self.load.ok[what] += 1
        except Exception:  # noqa: BLE001 - a refused or failed call is counted, not fatal
            self.load.failed[what] += 1
            time.sleep(0.1)
        self.load.slowest_s = max(self.load.slowest_s, time.monotonic() - t0)

    def _client_loop(self, client: AdminClient, uuid: str) -> None:
        while not self._stop.is_set():
            self._timed("status", client.call, "status")
            self._timed("ping", client.call, "ping")
            self._timed("stats", client.call, "get_instance_stats", {"instance_uuid": uuid})
            time.sleep(0.05)

    def _scrape_loop(self) -> None:
        while not self._stop.is_set():
            self._timed("scrape", self._scrape)
            time.sleep(0.2)

    def _scrape(self) -> None:
        assert self._metrics(timeout=30).startswith(b"HTTP/1.0 200")

    # -- faults ----------------------------------------------------------------

    def _admin(self) -> AdminClient:
        assert self.admin is not None
        return self.admin

    def alive(self) -> bool:
        return self.agent is not None and self.agent.proc.poll() is None

    def status(self) -> dict[str, Any]:
        reply: dict[str, Any] = self._admin().call("status")
        return reply

    def connected(self) -> bool:
        return bool(self.status()["libvirt"]["connected"])

    def freeze(self, seconds: float) -> Cycle:
        """SIGSTOP the daemon for ``seconds``, continue it, and check the agent."""
        assert self.daemon is not None
        cycle = Cycle("freeze" if seconds > sum(self.keepalive) else "short freeze", seconds)
        self.daemon.send_signal(signal.SIGSTOP)
        cycle.lost_seen, cycle.disabled_seen = self._watch_lost(seconds)
        self.daemon.send_signal(signal.SIGCONT)
        return self._after(cycle)

    def kill_and_restart(self, dead_s: float = 1.0) -> Cycle:
        """SIGKILL the daemon, start a new one on the same socket, redefine the domains."""
        assert self.daemon is not None
        cycle = Cycle("kill", dead_s)
        self.daemon.kill()
        self.daemon.wait(10)
        cycle.lost_seen, cycle.disabled_seen = self._watch_lost(dead_s)
        self.daemon, _ = private_libvirtd(self.root / "lv")
        self._keep()
        for xml in self.xml:
            self._keeper.defineXML(xml).create()
        return self._after(cycle)

    def _keep(self) -> None:
        """Hold a connection of our own (no keepalive, so no freeze closes it):
        the test driver's default host lives only while someone is connected,
        and the agent's connections all go when a freeze outlives their keepalive."""
        self._keeper = libvirt.open(self.uri)

    def _watch_lost(self, seconds: float) -> tuple[bool, bool]:
        """Wait ``seconds``; whether /metrics said libvirt was down, and the
        service disabled, meanwhile."""
        end, lost, disabled = time.monotonic() + seconds, False, False
        while time.monotonic() < end:
            try:
                data = self._metrics()
                lost = lost or b"\ncompute_agent_libvirt_connected 0.0" in data
                disabled = disabled or b"\ncompute_agent_service_disabled 1.0" in data
            except OSError:
                pass
            time.sleep(0.2)
        return lost, disabled

    def _metrics(self, timeout: float = 5) -> bytes:
        """One scrape of /metrics, headers included."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as sock:
            sock.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            data = b""
            while chunk := sock.recv(1 << 16):
                data += chunk
        return data

    def _after(self, cycle: Cycle, limit: float = 60) -> Cycle:
        """Wait until connected and a forced sync checks every instance."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < limit and self.alive():
            try:
                if self.connected():
                    summary = self._admin().call("sync_power_states")
                    if summary.get("aborted") is None:
                        cycle.checked = summary["checked"] + summary["skipped"]
                        if cycle.checked == self.instances:
                            cycle.back_s = round(time.monotonic() - t0, 2)
                            break
            except Exception:  # noqa: BLE001 - not back yet
                pass
            time.sleep(0.2)
        cycle.alive = self.alive()
        if cycle.alive and cycle.back_s is not None:
            cycle.events_back = self._event_reaches_agent()
            cycle.enabled_after = self._enabled_again()
        return cycle

    def _enabled_again(self, limit: float = 10) -> bool:
        """The AUTO: disable is lifted once libvirt is back (the heartbeat does it)."""
        end = time.monotonic() + limit
        while time.monotonic() < end:
            if b"\ncompute_agent_service_disabled 0.0" in self._metrics():
                return True
            time.sleep(0.2)
        return False

    def _event_reaches_agent(self, limit: float = 10) -> bool:
        """Pause and resume one domain out of band; the agent must receive the events."""
        before = self._admin().call("status")["events"]["received"]
        dom = self._keeper.lookupByName(self.names[0])
        dom.suspend()
        dom.resume()
        end = time.monotonic() + limit
        while time.monotonic() < end:
            if self._admin().call("status")["events"]["received"] > before:
                return True
            time.sleep(0.1)
        return False
