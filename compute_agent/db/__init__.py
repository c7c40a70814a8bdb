"""Persistence: SQLAlchemy models, the data-access API and Alembic migrations."""
