"""Indexes for a database with many dead rows: the purge and the reaper.

Revision ID: 0003
Revises: 0002

The purge finds soft-deleted instances by ``deleted_at``; the reaper looks
domain names up among a host's soft-deleted instances, which (host, deleted)
alone made a scan of every dead row of the host. A host's live instances get
an index of their own where partial indexes exist (SQLite, PostgreSQL; a
plain one on MySQL): once ANALYZE had seen as many dead rows as live ones,
SQLite scanned the whole table for them.
"""

from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # MariaDB commits each CREATE INDEX by itself: a sync killed half-way
    # left some, and running it again must create only the others.
    existing = {ix["name"] for ix in sa.inspect(op.get_bind()).get_indexes("instances")}
    for name, columns, where in (
        ("ix_instances_deleted_at", ["deleted_at"], None),
        ("ix_instances_host_deleted_domain_name", ["host", "deleted", "domain_name"], None),
        ("ix_instances_live_host", ["host"], ("deleted = 0", "deleted = false")),
    ):
        if name in existing:
            continue
        partial: dict[str, Any] = {}
        if where is not None:
            partial = {
                "sqlite_where": sa.text(where[0]),
                "postgresql_where": sa.text(where[1]),
            }
        op.create_index(name, "instances", columns, **partial)
