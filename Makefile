# The two commands of the README: `make run` and `make test`.
# Each does its own set-up on a fresh Debian 12 machine.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CONFIG := etc/compute-agent.conf
PYTEST_ARGS ?=
.PHONY: run test setup host host-min libvirtd lint genconfig bench clean

run: host-min $(STAMP)
	$(BIN)/compute-agent-manage --config-file $(CONFIG) db sync
	exec $(BIN)/compute-agent --config-file $(CONFIG)

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
