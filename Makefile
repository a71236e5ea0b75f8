# cgrid-s2s — the two commands a newcomer needs are `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

# `make run` is the laptop/demo mode: loopback may be called, so the mock DSP works.
# In production leave CGRID_ALLOWED_NETWORKS empty (or name only what you must).
export CGRID_ALLOWED_NETWORKS ?= 127.0.0.0/8

.PHONY: install run test lint chaos bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

run: install
	$(BIN)/python -m ops.fleet

test: install
	$(BIN)/pytest

# The fault-injection suite, long form: thousands of events, kills, a Redis restart.
chaos: install
	$(BIN)/python -m tests.chaos $(CHAOS_ARGS)

lint: install
	$(BIN)/ruff check cgrid producer delivery worker archive ops tests bench
	$(BIN)/mypy

clean:
	rm -rf $(VENV) data .pytest_cache .mypy_cache .ruff_cache

# The benchmark: measures and prints, asserts nothing. BENCH_ARGS="--scenario fast --events 20000"
bench: install
	$(BIN)/python -m bench.run $(BENCH_ARGS)
