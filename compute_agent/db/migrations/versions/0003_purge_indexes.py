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

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_instances_deleted_at", "instances", ["deleted_at"])
    op.create_index(
        "ix_instances_host_deleted_domain_name", "instances", ["host", "deleted", "domain_name"]
    )
    op.create_index(
        "ix_instances_live_host",
        "instances",
        ["host"],
        sqlite_where=sa.text("deleted = 0"),
        postgresql_where=sa.text("deleted = false"),
    )
