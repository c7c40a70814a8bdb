"""Alembic environment: always runs on the connection the agent hands it."""

from __future__ import annotations

from alembic import context

from compute_agent.db.models import Base

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=Base.metadata)
with context.begin_transaction():
    context.run_migrations()
