"""What the RPC benchmarks share: a RabbitMQ run of their own, configs, child processes.

oslo.messaging names a server's queue ``compute.<host>`` whatever the
exchange, so every run gets its own exchange *and* its own host names, and
deletes the queues and exchange it declared when done. Reply and fan-out
queues expire by themselves (``TRANSIENT_TTL``).

Configs take the option groups from a config file, as an agent reads them;
``[DEFAULT]`` options are set as overrides.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid as uuidlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import kombu
from oslo_config import cfg
from oslo_messaging import opts as messaging_opts

from compute_agent.conf import register_all
from compute_agent.rpc import TOPIC

TRANSPORT_URL = os.environ.get("COMPUTE_AGENT_TEST_RABBIT", "rabbit://guest:guest@127.0.0.1:5672/")
TRANSIENT_TTL = 30
REPO = pathlib.Path(__file__).resolve().parents[1]


def _set_transient_ttl(conf: cfg.ConfigOpts) -> None:
    group = "oslo_messaging_rabbit"
    for name, opts in messaging_opts.list_opts():
        if name == group:
            conf.register_opts(opts, group=group)
    conf.set_override("rabbit_transient_queues_ttl", TRANSIENT_TTL, group)


def build_conf(
    host: str,
    exchange: str,
    *,
    groups: Mapping[str, Mapping[str, Any]] | None = None,
    transport_url: str = TRANSPORT_URL,
    **defaults: Any,
) -> cfg.ConfigOpts:
    """A parsed agent (or client) config: ``groups`` go through a config file."""
    state = tempfile.mkdtemp(prefix="ca-bench-rpc-")
    atexit.register(shutil.rmtree, state, True)
    lines: list[str] = []
    for group, values in (groups or {}).items():
        lines.append(f"[{group}]")
        lines += [f"{key} = {value}" for key, value in values.items()]
    path = pathlib.Path(state, "bench.conf")
    path.write_text("\n".join(lines) + "\n")
    conf = cfg.ConfigOpts()
    register_all(conf)
    conf(["--config-file", str(path)], project="compute-agent")
    settings: dict[str, Any] = {
        "host": host,
        "state_path": state,
        "periodic_fuzzy_delay": 0,
        "transport_url": transport_url,
        "control_exchange": exchange,
        **defaults,
    }
    for key, value in settings.items():
        conf.set_override(key, value)
    _set_transient_ttl(conf)
    return conf


def require_broker(url: str = TRANSPORT_URL) -> None:
    """Fail at once, in one line, when no RabbitMQ answers at ``url``."""
    try:
        with kombu.Connection(url.replace("rabbit://", "amqp://", 1), connect_timeout=5) as conn:
            conn.ensure_connection(max_retries=1)
    except Exception as exc:  # noqa: BLE001 - any failure means no usable broker
        raise RuntimeError(
            f"no RabbitMQ at {url.split('@')[-1]} ({type(exc).__name__}: {exc}); "
            "set COMPUTE_AGENT_TEST_RABBIT"
        ) from None


class BenchRabbit:
    """An exchange and host names unique to one run, and deleting them afterwards."""

    def __init__(self, name: str, url: str = TRANSPORT_URL) -> None:
        require_broker(url)
        self.url = url
        self.run_id = uuidlib.uuid4().hex[:8]
        self.exchange = f"bench-{name}-{self.run_id}"
        self.hosts: list[str] = []

    def host(self, name: str) -> str:
        host = f"{name}-{self.run_id}"
        self.hosts.append(host)
        return host

    def client_conf(self) -> cfg.ConfigOpts:
        return build_conf(f"bench-client-{self.run_id}", self.exchange, transport_url=self.url)

    def cleanup(self) -> list[str]:
        """Delete this run's server queues and exchange; return what could not be."""
        problems: list[str] = []
        try:
            with kombu.Connection(self.url.replace("rabbit://", "amqp://", 1)) as conn:
                channel = conn.channel()
                for host in self.hosts:
                    try:
                        channel.queue_delete(f"{TOPIC}.{host}")
                    except conn.channel_errors as exc:
                        problems.append(f"queue {TOPIC}.{host}: {exc}")
                        channel = conn.channel()
                try:
                    # The topic queue is shared by every exchange: only if nobody uses it.
                    channel.queue_delete(TOPIC, if_unused=True, if_empty=True)
                except conn.channel_errors:
                    channel = conn.channel()
                channel.exchange_delete(self.exchange)
        except Exception as exc:  # noqa: BLE001 - reported, never hides the benchmark's result
            problems.append(f"{type(exc).__name__}: {exc}")
        return problems


class Child:
    """A benchmark helper process: JSON lines on stdout, stderr to a file, stdin as a leash.

    The child stops when its stdin closes, so it also stops if the benchmark dies.
    """

    def __init__(self, module: str, args: Sequence[str], label: str) -> None:
        self.label = label
        fd, self.log_path = tempfile.mkstemp(prefix=f"ca-bench-{label}-", suffix=".log")
        self._log = os.fdopen(fd, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            cwd=REPO,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
            # Out of the terminal's process group: a Ctrl-C (or `timeout`) reaches
            # the benchmark only, which then stops its children in order.
            start_new_session=True,
        )

    def readline(self) -> str:
        """The child's next stdout line (green: the pipe is eventlet's)."""
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(
                f"{self.label} exited early (status {self.proc.poll()}):\n{self.tail()}"
            )
        return line.rstrip("\n")

    def rest(self) -> list[str]:
        """What the child printed after the last line read (once it has exited)."""
        assert self.proc.stdout is not None
        try:
            return [line for line in self.proc.stdout.read().splitlines() if line]
        except (OSError, ValueError):
            return []

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(pathlib.Path(self.log_path).read_text().splitlines()[-lines:])
        except OSError:
            return ""

    def close_stdin(self) -> None:
        try:
            if self.proc.stdin is not None and not self.proc.stdin.closed:
                self.proc.stdin.close()
        except OSError:
            pass

    def alive(self) -> bool:
        return self.proc.poll() is None


def stop_children(children: Sequence[Child], grace: float = 20.0) -> list[str]:
    """Close every child's stdin, wait ``grace`` s in all, then kill those left.

    Returns a note per child that had to be killed or exited non-zero.
    """
    from compute_agent import green

    for child in children:
        child.close_stdin()
    deadline = green.monotonic() + grace
    for child in children:
        while child.alive() and green.monotonic() < deadline:
            green.sleep(0.05)
    notes: list[str] = []
    for child in children:
        note = None
        if child.alive():
            child.proc.terminate()
            try:
                child.proc.wait(5)
            except subprocess.TimeoutExpired:
                child.proc.kill()
                child.proc.wait(5)
            note = f"{child.label}: killed after {grace:.0f} s (log {child.log_path})"
        elif child.proc.returncode != 0:
            note = f"{child.label}: exit status {child.proc.returncode}: {child.tail(5)}"
        child._log.close()
        if note is None:
            os.unlink(child.log_path)  # nothing to look at
        else:
            notes.append(note)
    return notes


@contextlib.contextmanager
def interrupts_to_main() -> Iterator[None]:
    """While open, SIGINT and SIGTERM raise KeyboardInterrupt in this greenthread only.

    Under eventlet, Python raises it in whichever greenthread runs when the
    signal lands: in oslo.messaging's reply poller, say, which then dies and
    leaves every later call waiting for its timeout, so the clean-up never
    runs. Here it is thrown into the benchmark's own greenthread, whose
    ``finally`` clauses stop the children and drop what was created; a
    second signal during that clean-up is ignored.
    """
    from compute_agent import green

    if not green.HAS_HUB:
        # Native threads: Python already raises it in the main thread, the benchmark's.
        yield
        return
    import greenlet  # only under eventlet: a threads-mode process never loads it

    main = greenlet.getcurrent()
    delivered = False

    def handler(signum: int, _frame: object) -> None:
        nonlocal delivered
        if delivered:
            return
        delivered = True
        error = KeyboardInterrupt(f"{signal.Signals(signum).name}: cleaning up")
        print(f"\n{signal.Signals(signum).name}: stopping and cleaning up ...", flush=True)
        if greenlet.getcurrent() is main:
            raise error
        green.spawn(main.throw, error, name="interrupt")

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
