# The two commands of the README: `make run` and `make test`.
# Each does its own set-up on a fresh Debian 12 machine.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CONFIG := etc/compute-agent.conf
PYTEST_ARGS ?=
# Unit test files run again on native threads. Not here:
# test_hub_budget, test_hub_monitor, test_libvirt_driver,
# test_sdnotify and test_service (hub-only checks), test_manager and
# test_libvirt_events (a sync started at service start runs in parallel with what the
# test does next), test_intake (two waiters admitted together record their turn in either
# order).
THREADS_UNIT := admin_deadlines admin_socket concurrency config dashboard db db_deadlines dispatch errors \
	fake_driver green layers lifecycle locks log_files \
	log_secrets manage_cli metrics operations operator_commands ownership \
	packaging periodic power_sync races reaper recovery resume rpc statistics stats \
	steady stress_bench sync_policy transport_password
THREADS_TESTS := $(patsubst %,tests/unit/test_%.py,$(THREADS_UNIT))

.PHONY: run test setup host host-min libvirtd lint genconfig bench clean

run: host-min $(STAMP)
	$(BIN)/compute-agent-manage --config-file $(CONFIG) db sync
	exec $(BIN)/compute-agent --config-file $(CONFIG)

test: host libvirtd $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python -m pytest $(PYTEST_ARGS)
	# The same concurrency API on native threads (compute_agent/green.py).
	COMPUTE_AGENT_CONCURRENCY=threads $(BIN)/python -m pytest -p no:cacheprovider $(THREADS_TESTS)

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
