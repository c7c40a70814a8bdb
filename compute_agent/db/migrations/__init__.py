"""Alembic's environment and revisions: a package, so that setuptools installs them."""
