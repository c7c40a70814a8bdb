"""Test set-up: green first, then fixtures for config and the three databases."""

from compute_agent import green

green.monkey_patch()

import os  # noqa: E402
import uuid  # noqa: E402
from collections.abc import Iterator  # noqa: E402

import pytest  # noqa: E402
import sqlalchemy as sa  # noqa: E402
from oslo_config import cfg  # noqa: E402

from compute_agent.conf import register_all  # noqa: E402
from compute_agent.db import migration  # noqa: E402
from compute_agent.db.api import Database  # noqa: E402
from compute_agent.db.models import Base  # noqa: E402

# Server URLs; the servers run on this machine and `make test` starts them.
SERVER_URLS = {
    "postgresql": os.environ.get(
        "COMPUTE_AGENT_TEST_POSTGRESQL", "postgresql+pg8000://postgres@127.0.0.1:5432/postgres"
    ),
    "mysql": os.environ.get("COMPUTE_AGENT_TEST_MYSQL", "mysql+pymysql://root@127.0.0.1:3306/"),
}
# The same PostgreSQL through PgBouncer in transaction pooling mode
# (tools/setup-host.sh runs it): the database is made on the server, the agent
# connects through the pooler with [database] transaction_pooling.
PGBOUNCER_URL = os.environ.get(
    "COMPUTE_AGENT_TEST_PGBOUNCER", "postgresql+pg8000://postgres@127.0.0.1:6432/postgres"
)
PGBOUNCER = "postgresql-pgbouncer"
SERVER_BACKENDS = ("postgresql", "mysql", PGBOUNCER)
# A test that needs a database server carries this mark: `make check` (no
# server) deselects it, `make test` runs it.
SERVER_DB = pytest.mark.server_db
# Set by `make check`: a test that reaches for a server without the mark fails
# and says so, rather than passing here and failing on a machine without one.
NO_SERVERS = os.environ.get("COMPUTE_AGENT_TEST_NO_SERVERS") == "1"


def backend_params(*backends: str) -> list:
    """``backends`` as pytest params, the server ones marked :data:`SERVER_DB`."""
    return [pytest.param(b, marks=SERVER_DB) if b in SERVER_BACKENDS else b for b in backends]


BACKENDS = backend_params("sqlite", "postgresql", "mysql", PGBOUNCER)


@pytest.fixture
def conf(tmp_path) -> cfg.ConfigOpts:
    """A fresh, parsed config with test-friendly values and no config file."""
    c = cfg.ConfigOpts()
    register_all(c)
    c([], project="compute-agent")
    c.set_override("state_path", str(tmp_path))
    c.set_override("host", "test-host")
    c.set_override("periodic_fuzzy_delay", 0)
    return c


class _ServerDatabase:
    """A throw-away database on a server, created for this test session."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.admin_url = sa.make_url(SERVER_URLS[backend])
        self.name = f"ca_test_{uuid.uuid4().hex[:10]}"
        # Pre-ping: the fault tests restart the server under this engine.
        self.admin = sa.create_engine(
            self.admin_url, isolation_level="AUTOCOMMIT", pool_pre_ping=True
        )
        with self.admin.connect() as conn:
            conn.execute(sa.text(f"CREATE DATABASE {self.name}"))
        self.url = self.admin_url.set(database=self.name).render_as_string(hide_password=False)

    def drop(self) -> None:
        with self.admin.connect() as conn:
            if self.backend == "postgresql":
                conn.execute(sa.text(f"DROP DATABASE IF EXISTS {self.name} WITH (FORCE)"))
            else:
                conn.execute(sa.text(f"DROP DATABASE IF EXISTS {self.name}"))
        self.admin.dispose()


@pytest.fixture(scope="session")
def db_url_factory(tmp_path_factory) -> Iterator:
    """Make an empty database of a backend; all are dropped at session end."""
    made: list[_ServerDatabase] = []

    def make(backend: str) -> str:
        if backend == "sqlite":
            path = tmp_path_factory.mktemp("sqlite") / "test.sqlite"
            return f"sqlite:///{path}"
        if NO_SERVERS:
            pytest.fail(f"this test needs a {backend} server: mark it server_db (conftest.py)")
        server = _ServerDatabase("postgresql" if backend == PGBOUNCER else backend)
        made.append(server)
        if backend == PGBOUNCER:
            pooler = sa.make_url(PGBOUNCER_URL).set(database=server.name)
            return pooler.render_as_string(hide_password=False)
        return server.url

    yield make
    for server in made:
        server.drop()


@pytest.fixture(scope="session")
def _migrated(db_url_factory) -> dict[str, Database]:
    return {}


@pytest.fixture(params=BACKENDS)
def db(request, db_url_factory, _migrated) -> Iterator[Database]:
    """A migrated database of each backend, emptied before every test."""
    backend = request.param
    if backend not in _migrated:
        database = Database(db_url_factory(backend), transaction_pooling=backend == PGBOUNCER)
        migration.upgrade(database)
        _migrated[backend] = database
    database = _migrated[backend]
    with database.engine.begin() as conn:
        for table in reversed(Base.metadata.sorted_tables):
            conn.execute(table.delete())
    database.statements = 0
    yield database


@pytest.fixture
def sqlite_db(tmp_path) -> Iterator[Database]:
    database = Database(f"sqlite:///{tmp_path}/agent.sqlite")
    migration.upgrade(database)
    yield database
    database.dispose()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``@pytest.mark.hub_only("why")``: skipped on native threads, saying why."""
    if green.HAS_HUB:
        return
    for item in items:
        marker = item.get_closest_marker("hub_only")
        if marker is not None:
            why = marker.args[0] if marker.args else "checks the eventlet hub"
            item.add_marker(pytest.mark.skip(reason=f"hub only: {why}"))
