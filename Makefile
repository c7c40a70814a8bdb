# The commands of the README: `make run`, `make check` and `make test`.
# run and test do their own set-up on a fresh Debian 12 machine.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CONFIG := etc/compute-agent.conf
PYTEST_ARGS ?=

.PHONY: run check test setup host host-min libvirtd lint genconfig bench clean

run: host-min $(STAMP)
	$(BIN)/compute-agent-manage --config-file $(CONFIG) db sync
	exec $(BIN)/compute-agent --config-file $(CONFIG)

# The inner loop, about a minute: ruff, mypy and the unit tests in four
# processes (tools/unit_shards.py), with no database server, broker, libvirtd,
# apt or sudo. It deselects the tests that need a PostgreSQL, MariaDB or
# PgBouncer server (server_db) and the soaks (slow); `make test` runs them.
# COMPUTE_AGENT_TEST_NO_SERVERS makes an unmarked test that reaches for a
# server fail and say so. One thing it cannot do without apt: libvirt-python
# is only an sdist on PyPI, so the first `pip install` (the .venv) builds it
# and needs libvirt-dev, pkg-config, gcc and python3-dev once (`make host-min`).
CHECK_MARKS := not server_db and not slow
check: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy
	COMPUTE_AGENT_TEST_NO_SERVERS=1 $(BIN)/python tools/unit_shards.py -m "$(CHECK_MARKS)" $(PYTEST_ARGS)

test: host libvirtd $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python -m pytest $(PYTEST_ARGS)
	# Every test again on native threads (concurrency_backend = threads); the few
	# that check the eventlet hub itself (@pytest.mark.hub_only) skip, saying why.
	COMPUTE_AGENT_CONCURRENCY=threads $(BIN)/python -m pytest -p no:cacheprovider $(PYTEST_ARGS)

setup: host $(STAMP)

# apt packages and local services (PostgreSQL, MariaDB, RabbitMQ) for the tests.
host:
	tools/setup-host.sh

# A real libvirtd with the QEMU driver (qemu:///system) for the functional
# tests and the benchmarks.
libvirtd:
	tools/setup-libvirtd.sh

# apt packages only: the agent's embedded default needs no service.
host-min:
	SETUP_SERVICES=0 tools/setup-host.sh

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

genconfig: $(STAMP)
	$(BIN)/oslo-config-generator --config-file etc/oslo-config-generator.conf

# The benchmarks; the libvirt ones also go through a real libvirtd.
bench: host libvirtd $(STAMP)
	$(BIN)/python -m bench $(BENCH)

clean:
	rm -rf $(VENV) .tox .pytest_cache .ruff_cache .mypy_cache build *.egg-info
