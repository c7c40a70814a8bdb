"""The service row's owner token: which running agent holds the host.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Nullable, no default: rows of agents that ran before this revision
    # have no owner, and the next agent to start claims them.
    with op.batch_alter_table("services") as batch:
        batch.add_column(sa.Column("owner", sa.String(36), nullable=True))
