"""A database account allowed one connection: a real "too many clients" on demand.

PostgreSQL's ``CONNECTION LIMIT 1`` on a role and MariaDB's
``MAX_USER_CONNECTIONS 1`` on a user make the server itself refuse a
second connection (SQLSTATE 53300, MariaDB error 1226), exactly as a
server at its max_connections refuses every newcomer, without touching the
shared server's max_connections. :meth:`hold` takes the one connection,
:meth:`release` gives it back mid-test.
"""

from __future__ import annotations

import uuid
from typing import Any

import sqlalchemy as sa


class BusyAccount:
    """A throw-away account on the database of ``url`` (made with the admin's rights)."""

    def __init__(self, url: str) -> None:
        self.admin_url = sa.make_url(url)
        self.backend = self.admin_url.get_backend_name()
        self.name = f"i24_busy_{uuid.uuid4().hex[:8]}"
        self.database = self.admin_url.database
        self._admin = sa.create_engine(self.admin_url, isolation_level="AUTOCOMMIT")
        self._held: Any = None
        with self._admin.connect() as conn:
            if self.backend == "postgresql":
                conn.execute(sa.text(f"CREATE ROLE {self.name} LOGIN CONNECTION LIMIT 1"))
                for what in ("TABLES", "SEQUENCES"):
                    conn.execute(
                        sa.text(f"GRANT ALL ON ALL {what} IN SCHEMA public TO {self.name}")
                    )
            else:
                conn.execute(sa.text(f"CREATE USER '{self.name}'@'%' WITH MAX_USER_CONNECTIONS 1"))
                conn.execute(sa.text(f"GRANT ALL ON {self.database}.* TO '{self.name}'@'%'"))
        self.url = self.admin_url.set(username=self.name, password=None).render_as_string(
            hide_password=False
        )

    def hold(self) -> None:
        """Take the account's only connection (a plain DB-API one, outside any pool)."""
        engine = sa.create_engine(self.url, poolclass=sa.pool.NullPool)
        self._held = engine.raw_connection()

    def release(self) -> None:
        if self._held is not None:
            self._held.close()
            self._held = None

    def drop(self) -> None:
        self.release()
        with self._admin.connect() as conn:
            if self.backend == "postgresql":
                conn.execute(
                    sa.text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        f"WHERE usename = '{self.name}'"
                    )
                )
                conn.execute(sa.text(f"DROP OWNED BY {self.name}"))
                conn.execute(sa.text(f"DROP ROLE {self.name}"))
            else:
                conn.execute(sa.text(f"DROP USER '{self.name}'@'%'"))
        self._admin.dispose()
