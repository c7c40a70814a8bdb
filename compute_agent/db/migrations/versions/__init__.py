"""The schema revisions (Alembic skips this file: it is no revision)."""
