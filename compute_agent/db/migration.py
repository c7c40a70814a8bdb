"""Schema migrations with Alembic, driven from code (no alembic.ini to ship)."""

from __future__ import annotations

import os

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from compute_agent.db.api import Database
from compute_agent.db.engine import unreachable_as_typed
from compute_agent.exception import SchemaError

_SCRIPTS = os.path.join(os.path.dirname(__file__), "migrations")


def _config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", _SCRIPTS)
    return cfg


def head_revision() -> str:
    head = ScriptDirectory.from_config(_config()).get_current_head()
    assert head is not None
    return head


def revisions() -> list[str]:
    """Every schema revision, oldest first (the upgrade tests build each)."""
    walked = ScriptDirectory.from_config(_config()).walk_revisions()
    return [rev.revision for rev in reversed(list(walked))]


def current_revision(db: Database) -> str | None:
    with unreachable_as_typed(), db.engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(db: Database, revision: str = "head") -> str:
    """Migrate the schema to ``revision``; return the revision now current."""
    cfg = _config()
    with unreachable_as_typed(), db.engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)
    return current_revision(db) or ""


def check_schema(db: Database) -> None:
    """Raise SchemaError unless the schema is exactly at this agent's head."""
    current, head = current_revision(db), head_revision()
    if current == head:
        return
    if current is None:
        raise SchemaError(
            f"database {db.safe_url} has no schema; run 'compute-agent-manage db sync'"
        )
    known = {rev.revision for rev in ScriptDirectory.from_config(_config()).walk_revisions()}
    if current not in known:
        raise SchemaError(
            f"database {db.safe_url} is at schema revision {current}, newer than this "
            f"agent knows (head {head}); upgrade the agent"
        )
    raise SchemaError(
        f"database {db.safe_url} is at schema revision {current}, this agent needs {head}; "
        "run 'compute-agent-manage db sync'"
    )
