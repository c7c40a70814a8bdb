"""Security end to end: the admin socket, secrets in logs and output, foreign domains.

One agent (a subprocess) runs with ``debug = true``, which logs every
option's value at start, with a distinctive password in its
``transport_url`` (a throw-away RabbitMQ user, so the agent really logs in
with it) and in ``[database] connection`` (PostgreSQL's trust auth accepts
any password). It runs on the real libvirtd with a prefix of its own, and
under umask 000, so that the socket's mode owes nothing to the caller.
Whatever the agent and the CLI print, in any format and on any failure,
must not hold either password.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import signal
import stat
import subprocess
import tempfile
import uuid as uuidlib
from collections.abc import Iterator
from dataclasses import dataclass

import libvirt
import pytest
import sqlalchemy as sa

from compute_agent import exception
from compute_agent.db.api import Database
from compute_agent.db.models import Instance
from compute_agent.rpcapi import ComputeAPI
from tests.functional import qemu
from tests.functional.agent_process import AgentProcess, manage, manage_all
from tests.functional.rabbit import TRANSIENT_TTL, RabbitRun
from tests.helpers import eventually

# A token no log line or output could hold by chance; both passwords carry it.
TOKEN = uuidlib.uuid4().hex
RABBIT_USER = f"ca-test-{TOKEN[:8]}"
RABBIT_PASSWORD = f"Rq{TOKEN}#x"  # '#' must be URL-quoted: the log must hide both forms
RABBIT_PASSWORD_QUOTED = f"Rq{TOKEN}%23x"
# oslo.messaging cannot pass a '/' on to kombu, whose error then quoted the password:
# the agent now refuses it at start.
SLASHED_PASSWORD_QUOTED = f"Rq{TOKEN}%2Fx"
DB_PASSWORD = f"Pg{TOKEN}"
NOBODY = "nobody"


def rabbitmqctl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["rabbitmqctl", *args], capture_output=True, text=True, timeout=60, check=False
    )


def assert_no_secret(text: str, where: str) -> None:
    assert TOKEN not in text, f"a password leaked in {where}:\n{text}"


def db_url_with_password(url: str, port: int = 5432) -> str:
    return (
        sa.make_url(url).set(password=DB_PASSWORD, port=port).render_as_string(hide_password=False)
    )


@dataclass
class Env:
    prefix: str
    host: str
    root: pathlib.Path  # 0755, made by the test: the socket's own mode must refuse others
    api: ComputeAPI
    db: Database
    db_url: str  # with the password
    agent: AgentProcess
    config_files: list[pathlib.Path]
    run: RabbitRun

    @property
    def socket(self) -> pathlib.Path:
        return self.root / "admin.sock"

    def set_row(self, uuid: str, **values: str) -> None:
        """Write a row behind the agent's back."""
        table = Instance.__table__
        with self.db.engine.begin() as c:
            c.execute(sa.update(table).where(table.c.uuid == uuid).values(**values))


def _agent_conf(env_root: pathlib.Path, host: str, prefix: str, run: RabbitRun, db_url: str) -> str:
    transport = f"rabbit://{RABBIT_USER}:{RABBIT_PASSWORD_QUOTED}@127.0.0.1:5672/"
    return (
        f"[DEFAULT]\nhost = {host}\nstate_path = {env_root}/state\n"
        f"admin_socket = {env_root}/admin.sock\ndebug = true\n"
        "report_interval = 1\nperiodic_fuzzy_delay = 0\n"
        f"transport_url = {transport}\ncontrol_exchange = {run.exchange}\n"
        f"[oslo_messaging_rabbit]\nrabbit_transient_queues_ttl = {TRANSIENT_TTL}\n"
        "[compute]\n"
        f"instance_name_template = {qemu.name_template(prefix)}\n"
        "sync_power_state_interval = 600\nstats_interval = 1\nshutdown_timeout = 1\n"
        "power_sync_action = enforce\n"  # the most aggressive: stops what it thinks is its own
        "[libvirt]\nconnection_uri = qemu:///system\nvirt_type = qemu\n"
        "lifecycle_event_delay = 1\n"
        f"[database]\nconnection = {db_url}\n"
    )


@pytest.fixture(scope="module")
def env(db_url_factory) -> Iterator[Env]:
    prefix = qemu.new_prefix()
    run = RabbitRun()
    root = pathlib.Path(tempfile.mkdtemp(prefix=f"{prefix}sec-"))
    root.chmod(0o755)  # traversable by anyone: only the socket's mode keeps others out
    added = rabbitmqctl("add_user", RABBIT_USER, RABBIT_PASSWORD)
    assert added.returncode == 0, added.stderr
    agent: AgentProcess | None = None
    api: ComputeAPI | None = None
    plain_url = db_url_factory("postgresql")
    db = Database(plain_url)
    try:
        perms = rabbitmqctl("set_permissions", "-p", "/", RABBIT_USER, ".*", ".*", ".*")
        assert perms.returncode == 0, perms.stderr
        db_url = db_url_with_password(plain_url)
        host = run.host("secure")
        conf = root / "agent.conf"
        conf.write_text(_agent_conf(root, host, prefix, run, db_url))
        files = [conf]
        synced = manage("db", "sync", config_files=files)
        assert synced.returncode == 0, synced.stderr
        assert_no_secret(synced.stdout + synced.stderr, "db sync")
        old_umask = os.umask(0)  # inherited by the agent only
        try:
            agent = AgentProcess(files)
        finally:
            os.umask(old_umask)
        agent.wait_for("RPC serving")
        api = ComputeAPI(run.conf(), timeout=30)
        yield Env(prefix, host, root, api, db, db_url, agent, files, run)
        agent.proc.send_signal(signal.SIGTERM)
        assert agent.wait_exit(15) == 0, agent.output
        assert_no_secret(agent.output, "the agent's log")
    finally:
        if agent is not None:
            agent.kill()
        if api is not None:
            api.close()
        qemu.remove_domains(prefix)
        rabbitmqctl("delete_user", RABBIT_USER)
        run.cleanup()
        db.dispose()
        shutil.rmtree(root, ignore_errors=True)
        check = qemu.open_system()
        try:
            left = [d.name() for d in check.listAllDomains() if d.name().startswith(prefix)]
        finally:
            check.close()
        assert left == [], f"domains left behind: {left}"


# -- the admin socket ---------------------------------------------------------

CONNECT_AS_OTHER = """
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    s.connect(sys.argv[1])
except OSError as exc:
    print(exc.errno)
else:
    print("connected")
"""


@pytest.mark.skipif(not qemu.is_root(), reason="switching to another user needs root")
def test_admin_socket_refuses_other_users_even_under_umask_000(env):
    """test_cli checks the modes under a normal umask; here the agent's umask is 000
    and the socket's directory is open to all, so only the socket's own mode
    stands between another user and every VM of the host."""
    mode = os.stat(env.socket).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
    state = env.root / "state"
    assert stat.S_IMODE(os.stat(state).st_mode) == 0o700  # made by the agent
    assert stat.S_IMODE(os.stat(env.root).st_mode) == 0o755
    # The system Python: the venv's lives under /root, which nobody cannot read.
    other = subprocess.run(
        ["/usr/bin/python3", "-c", CONNECT_AS_OTHER, str(env.socket)],
        user=NOBODY,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert other.stdout.strip() == str(13), other  # EACCES, from the socket's mode
    mine = manage("status", "-f", "json", config_files=env.config_files)
    assert mine.returncode == 0, mine.stderr  # its own user is served
    assert json.loads(mine.stdout)["host"] == env.host


# -- secrets ------------------------------------------------------------------


def test_passwords_never_appear_in_the_log_or_the_cli(env, tmp_path):
    # The agent really logged in to the broker as the throw-away user.
    eventually(
        lambda: RABBIT_USER in rabbitmqctl("list_connections", "user").stdout,
        10,
        "the agent's broker connection",
    )
    assert env.api.ping(env.host)["host"] == env.host
    # debug = true logged every option, the secret ones masked.
    env.agent.wait_for("transport_url", 5)
    assert any("transport_url" in line and "****" in line for line in env.agent.lines)
    assert any("connection" in line and "****" in line for line in env.agent.lines)

    wrong_db = tmp_path / "wrong-db.conf"  # a database nobody listens on
    wrong_db.write_text(f"[database]\nconnection = {db_url_with_password(env.db_url, 1)}\n")
    procs = manage_all(
        [
            ["status"],
            ["status", "-f", "json"],
            ["status", "-f", "value"],
            ["--help"],
            ["status", "--help"],
            ["instances", "--help"],
            ["db", "version"],
            ["db", "sync"],
            ["instances", "show", str(uuidlib.uuid4())],  # the agent's InstanceNotFound
            ["instances", "start", "not-a-uuid"],  # a usage error
            ["power-sync", "-f", "json"],
        ],
        config_files=env.config_files,
    )
    for proc in procs:
        assert_no_secret(proc.stdout + proc.stderr, f"compute-agent-manage {proc.args}")
    assert [p.returncode for p in procs] == [0, 0, 0, 0, 0, 0, 0, 0, 1, 2, 0], [
        (p.args, p.stderr) for p in procs
    ]
    failed = manage("db", "version", config_files=[*env.config_files, wrong_db])
    assert failed.returncode == 1 and "compute-agent-manage: error: " in failed.stderr
    assert_no_secret(failed.stdout + failed.stderr, "db version on a dead database")

    # The server drops the agent's connections, as in a database outage: the
    # agent logs what it found (at DEBUG) and reconnects with the password.
    seen = len(env.agent.lines)
    with env.db.engine.connect() as c:
        dropped = c.execute(
            sa.text(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        ).scalar()
    assert dropped >= 1
    eventually(
        lambda: any("dead database connection" in line for line in env.agent.lines[seen:]),
        10,
        "the agent's log of its dropped connections",
    )
    assert_no_secret(env.agent.output, "the agent's log")


def test_connection_failure_messages_do_not_leak(env, tmp_path):
    """A broker that refuses, and a database that is not there, both with the passwords."""
    base = env.config_files[0].read_text()
    broken_broker = tmp_path / "broker" / "agent.conf"
    broken_broker.parent.mkdir()
    broken_broker.write_text(
        base.replace(f"host = {env.host}", f"host = {env.run.host('no-broker')}")
        .replace("@127.0.0.1:5672/", "@127.0.0.1:1/")
        .replace(f"{env.root}/", f"{broken_broker.parent}/")
        .replace("qemu:///system", "test:///default")
        .replace("virt_type = qemu", "virt_type = test")
    )
    broken_db = tmp_path / "db" / "agent.conf"
    broken_db.parent.mkdir()
    broken_db.write_text(
        broken_broker.read_text()
        .replace(f"{broken_broker.parent}/", f"{broken_db.parent}/")
        .replace("@127.0.0.1:5432/", "@127.0.0.1:1/")
    )
    slashed = tmp_path / "slashed" / "agent.conf"
    slashed.parent.mkdir()
    slashed.write_text(
        broken_broker.read_text()
        .replace(f"{broken_broker.parent}/", f"{slashed.parent}/")
        .replace(
            f"{RABBIT_PASSWORD_QUOTED}@127.0.0.1:1/", f"{SLASHED_PASSWORD_QUOTED}@127.0.0.1:5672/"
        )
        .replace("host = no-broker", "host = slashed")
    )
    agents = [AgentProcess([p]) for p in (broken_broker, broken_db, slashed)]
    no_broker, no_db, slash = agents
    try:
        assert no_db.wait_exit(30) == 1
        lines = [line for line in no_db.lines if "cannot use database" in line]
        assert lines and "postgres:***@127.0.0.1:1/" in lines[0], no_db.output
        no_broker.wait_for("127.0.0.1:1", 30)  # oslo.messaging's unreachable line
        rc, _ = no_broker.terminate(timeout=15)
        assert rc == 0, no_broker.output
        # Refused at start (it once ran without RPC, kombu's error quoting the password).
        assert slash.wait_exit(30) == 2
        assert slash.lines[-1].startswith("compute-agent: error: [DEFAULT] transport_url")
    finally:
        for agent in agents:
            agent.kill()
    assert_no_secret(no_broker.output, "the log of an agent whose broker refuses")
    assert_no_secret(no_db.output, "the error of an agent without its database")
    assert_no_secret(slash.output, "the log of an agent whose password holds '/'")


# -- foreign domains ----------------------------------------------------------


def _snapshot(dom: libvirt.virDomain) -> tuple[int, str]:
    return dom.state()[0], dom.XMLDesc(0)


def test_foreign_domains_are_never_touched(env):
    api, host = env.api, env.host
    conn = qemu.open_system()
    try:
        x1, x2 = (str(uuidlib.uuid4()) for _ in range(2))
        for uid in (x1, x2):
            api.build_instance(host, {"uuid": uid, "name": "victim", "vcpus": 1, "memory_mb": 64})
        name1, name2 = f"{env.prefix}{x1}", f"{env.prefix}{x2}"
        # Someone else replaces both domains with their own, under the same names.
        for name in (name1, name2):
            dom = conn.lookupByName(name)
            dom.destroy()
            dom.undefine()
        for uid in (x1, x2):  # the agent saw the domains go (events)
            eventually(
                lambda u=uid: env.db.instance_get(u).power_state == "nostate", 10, "domain gone"
            )
        f1 = qemu.define_guest(conn, name1, str(uuidlib.uuid4()), start=True)
        f2 = qemu.define_guest(conn, name2, str(uuidlib.uuid4()))  # defined, shut off
        unclaimed = qemu.define_guest(
            conn, f"{env.prefix}unclaimed", str(uuidlib.uuid4()), start=True
        )
        foreign = {"f1": f1, "f2": f2, "unclaimed": unclaimed}
        before = {k: _snapshot(d) for k, d in foreign.items()}
        pid = qemu.qemu_pid(name1)

        # Both rows stopped: were either domain taken for the instance's, the
        # enforcing sync would stop f1 and a start would boot f2.
        for uid in (x1, x2):
            env.set_row(uid, vm_state="stopped", power_state="shutdown")
        forced = manage("power-sync", "-f", "json", config_files=env.config_files)
        assert forced.returncode == 0, forced.stderr
        assert "could not be synced" in forced.stderr  # the warning line
        summary = json.loads(forced.stdout)
        assert summary["foreign"] == 2 and summary["errors"] == 2, summary
        assert summary["domains_stopped"] == 0 and summary["changed"] == 0
        assert {name1, name2, f"{env.prefix}unclaimed"} <= set(summary["unknown_domains"])
        one = manage("power-sync", "--instance", x1, "-f", "json", config_files=env.config_files)
        assert json.loads(one.stdout)["foreign"] == 1, one.stderr
        env.agent.wait_for(f"domain {name1} has UUID {f1.UUIDString()}, not instance {x1}'s", 5)

        with pytest.raises(exception.InstanceInvalidState, match="not ours"):
            api.start_instance(host, x2)
        for uid in (x1, x2):
            env.set_row(uid, vm_state="active")
        with pytest.raises(exception.InstanceInvalidState, match="not ours"):
            api.stop_instance(host, x1)
        for hard in (False, True):
            with pytest.raises(exception.InstanceInvalidState, match="not ours"):
                api.reboot_instance(host, x1, hard=hard)
        row = env.db.instance_get(x1)
        assert (row.vm_state, row.task_state) == ("active", None)  # nothing half-done

        # Delete removes the instance (its row), never the domain that took its name.
        assert api.delete_instance(host, x1)["vm_state"] == "deleted"
        with pytest.raises(exception.InstanceNotFound):
            env.db.instance_get(x1)

        after = {k: _snapshot(conn.lookupByUUIDString(d.UUIDString())) for k, d in foreign.items()}
        assert after == before  # same state, same XML
        assert before["f1"][0] == libvirt.VIR_DOMAIN_RUNNING
        assert before["f2"][0] == libvirt.VIR_DOMAIN_SHUTOFF
        assert qemu.qemu_pid(name1) == pid  # never even restarted
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            conn.close()
