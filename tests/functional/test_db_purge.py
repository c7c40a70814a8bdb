"""``compute-agent-manage db purge`` as an operator runs it, on every backend."""

from __future__ import annotations

import json

import pytest
import sqlalchemy as sa

from compute_agent.db.models import Instance, InstanceAction
from compute_agent.utils import utcnow
from tests.functional.agent_process import REPO, manage, manage_all
from tests.helpers import create_instance, dead_instance

PREFIX = "compute-agent-manage: error: "


def config(tmp_path, url: str, pooled: bool = False) -> list:
    path = tmp_path / "purge.conf"
    path.write_text(
        f"[DEFAULT]\nstate_path = {tmp_path}/state\nhost = purge-host\n"
        f"[database]\nconnection = {url}\nconnect_timeout = 2\n"
        f"transaction_pooling = {str(pooled).lower()}\n"
    )
    return [REPO / "etc" / "compute-agent.conf", path]


def url_of(db) -> str:
    return db.url.render_as_string(hide_password=False)


def config_of(tmp_path, db) -> list:
    """The CLI's config for the ``db`` fixture's database (through PgBouncer too)."""
    return config(tmp_path, url_of(db), pooled=db.transaction_pooling)


def counts(db) -> tuple[int, int]:
    with db.engine.connect() as conn:
        return (
            int(conn.scalar(sa.select(sa.func.count()).select_from(Instance.__table__)) or 0),
            int(conn.scalar(sa.select(sa.func.count()).select_from(InstanceAction.__table__)) or 0),
        )


def one_line(proc, status: int, *needles: str) -> None:
    lines = proc.stderr.splitlines()
    assert proc.returncode == status, (proc.args, proc.returncode, proc.stderr)
    assert len(lines) == 1 and lines[0].startswith(PREFIX), proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_dry_run_then_purge_with_an_archive(db, tmp_path):
    files = config_of(tmp_path, db)
    live = create_instance(db, host="purge-host")
    for _ in range(3):
        dead_instance(db, "purge-host", 10)
    dead_instance(db, "purge-host", 1)
    before = counts(db)
    dry, table = manage_all(
        [
            ["db", "purge", "--older-than", "5", "--dry-run", "-f", "json"],
            ["db", "purge", "--older-than", "5", "--dry-run"],
        ],
        config_files=files,
    )
    assert dry.returncode == 0, dry.stderr
    planned = json.loads(dry.stdout)
    assert planned["dry_run"] is True and planned["instances"] == 3
    assert planned["instance_actions"] == 3 * 3  # create, then delete's two changes
    assert "| instances" in table.stdout and "dry run: nothing removed" in table.stdout
    assert counts(db) == before

    archive = tmp_path / "purged.jsonl"
    done = manage(
        "db", "purge", "--older-than", "5", "--batch", "2", "--archive", str(archive),
        "-f", "json", config_files=files,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert (result["instances"], result["instance_actions"]) == (3, 9)
    assert result["dry_run"] is False and result["archive"] == str(archive)
    assert len(archive.read_text().splitlines()) == 12
    assert counts(db) == (before[0] - 3, before[1] - 9)
    assert db.instance_get(live.uuid).uuid == live.uuid

    everything = manage("db", "purge", "--before", utcnow().isoformat() + "Z", config_files=files)
    assert everything.returncode == 0, everything.stderr
    assert "| instances        | 1    |" in everything.stdout
    assert counts(db) == (1, 1)  # the live instance and its create row


@pytest.mark.parametrize("db", ["sqlite"], indirect=True)
def test_bad_input_is_exit_2_in_one_line(db, tmp_path):
    files = config_of(tmp_path, db)
    procs = manage_all(
        [
            ["db", "purge", "--older-than", "soon"],
            ["db", "purge", "--older-than", "-1"],
            ["db", "purge", "--older-than", "nan"],
            ["db", "purge", "--before", "yesterday"],
            ["db", "purge", "--before", "2026-13-01"],
            ["db", "purge"],
            ["db", "purge", "--older-than", "1", "--before", "2026-01-01"],
            ["db", "purge", "--older-than", "1", "--batch", "0"],
            ["db", "purge", "--older-than", "1", "--batch", "many"],
        ],
        config_files=files,
    )
    needles = [
        "not a number of days",
        "must be from 0",
        "must be from 0",
        "not an ISO 8601 time",
        "not an ISO 8601 time",
        "one of the arguments --older-than --before is required",
        "not allowed with argument",
        "must be at least 1",
        "not an integer",
    ]
    for proc, needle in zip(procs, needles, strict=True):
        one_line(proc, 2, needle, "db purge")


@pytest.mark.parametrize("db", ["sqlite"], indirect=True)
def test_an_unreachable_database_or_archive_is_exit_1_in_one_line(db, tmp_path):
    down = config(tmp_path, "postgresql://nobody@127.0.0.1:18299/none")
    proc = manage("db", "purge", "--older-than", "0", config_files=down)
    one_line(proc, 1, "database unavailable")
    files = config_of(tmp_path, db)
    proc = manage(
        "db", "purge", "--older-than", "0", "--archive", str(tmp_path / "no" / "a.jsonl"),
        config_files=files,
    )  # fmt: skip
    one_line(proc, 1, "cannot open the archive")


def test_a_purge_beside_a_busy_agent_loses_no_live_row(tmp_path):
    """The CLI purges while the agent boots, deletes and syncs on the same SQLite file."""
    from tests.functional.agent_process import AgentProcess, synced_config

    files = synced_config(
        tmp_path,
        "purge-busy",
        default="report_interval = 1\n",
        rest="[compute]\nsync_power_state_interval = 1\nstats_interval = 1\n"
        "running_deleted_instance_poll_interval = 1\n",
    )
    agent = AgentProcess(files)
    try:
        agent.wait_for("admin socket listening")
        boot = ["instances", "boot", "--vcpus", "1", "--memory-mb", "64", "-f", "value", "-c",
                "uuid", "--name"]  # fmt: skip
        first = manage_all([[*boot, f"old-{i}"] for i in range(6)], config_files=files)
        uuids = [p.stdout.strip() for p in first]
        assert all(p.returncode == 0 for p in first), [p.stderr for p in first]
        gone, kept = uuids[:4], uuids[4:]
        deletes = manage_all([["instances", "delete", u] for u in gone], config_files=files)
        assert all(p.returncode == 0 for p in deletes), [p.stderr for p in deletes]
        # Boots, deletes and purges side by side (the agent syncs every second too).
        mixed = manage_all(
            [[*boot, f"new-{i}"] for i in range(4)]
            + [["instances", "delete", kept[0]]]
            + [["db", "purge", "--older-than", "0", "--batch", "1"]] * 3,
            config_files=files,
        )
        assert all(p.returncode == 0 for p in mixed), [(p.args, p.stderr) for p in mixed]
        new = [p.stdout.strip() for p in mixed[:4]]
        final = manage("db", "purge", "--older-than", "0", "-f", "json", config_files=files)
        assert final.returncode == 0, final.stderr
        listed = manage("instances", "list", "-f", "json", config_files=files)
        live = {r["uuid"] for r in json.loads(listed.stdout)}
        assert live == {kept[1], *new}
        for uuid in live:
            trail = manage("instances", "actions", uuid, "-f", "json", config_files=files)
            actions = [r["action"] for r in json.loads(trail.stdout)]
            assert actions[0] == "create", actions  # the whole trail, from its first row
        rc, _ = agent.terminate()
        assert rc == 0, agent.output
        assert "Traceback" not in agent.output and "database is locked" not in agent.output
    finally:
        agent.kill()
    db_path = tmp_path / "state" / "compute-agent.sqlite"
    engine = sa.create_engine(f"sqlite:///{db_path}")
    with engine.connect() as conn:
        dead = conn.execute(sa.text("SELECT count(*) FROM instances WHERE deleted")).scalar()
        orphans = conn.execute(
            sa.text(
                "SELECT count(*) FROM instance_actions a WHERE NOT EXISTS "
                "(SELECT 1 FROM instances i WHERE i.uuid = a.instance_uuid)"
            )
        ).scalar()
    engine.dispose()
    assert dead == 0 and orphans == 0
