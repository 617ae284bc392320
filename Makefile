# The front door: `make run` (embedded default), `make test`, `make lint`, `make bench`, `make migrate`,
# `make reliability` (fault injection + fuzz suites, then their table).
# Idempotent: the venv is (re)installed only when pyproject.toml is newer than its stamp.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PORT ?= 8000
LIVERSCAN_DATA_DIR ?= ./var
PYTEST_ARGS ?=
export PORT LIVERSCAN_DATA_DIR

.PHONY: run test lint bench migrate services reliability

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip

# Worker/runtime install: the package with TensorFlow (the embedded runner starts a worker too).
$(VENV)/.stamp-ml: pyproject.toml | $(PY)
	$(PY) -m pip install -e '.[ml]'
	touch $@

# Everything the test suite, linters and benchmarks need.
$(VENV)/.stamp-test: pyproject.toml $(VENV)/.stamp-ml
	$(PY) -m pip install -e '.[ml,onnx-export,test,dev]'
	touch $@

migrate: $(VENV)/.stamp-ml
	mkdir -p $(LIVERSCAN_DATA_DIR)
	$(VENV)/bin/alembic upgrade head

run: $(VENV)/.stamp-ml
	exec $(PY) -m worker.embedded --port $(PORT)  # migrates, then API + worker + sweep

services:
	bash scripts/ensure_services.sh

# pytest exit 5 ("no tests collected") is a failure, not a pass.
test: $(VENV)/.stamp-test services
	$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: no tests were collected" >&2; exit 1; fi; exit $$rc

lint: $(VENV)/.stamp-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

bench: $(VENV)/.stamp-test services
	$(PY) bench/service.py
	@for f in bench/ml_*.py; do [ -e "$$f" ] || continue; $(PY) "$$f" || exit $$?; done
	$(PY) bench/batch.py

# Fault injection (tests/reliability) and the fuzz suites (schemathesis, hypothesis), then the table
# of jobs submitted / terminal / lost / duplicated / webhooks delivered and the fuzz case counts.
RELIABILITY_RESULTS ?= $(LIVERSCAN_DATA_DIR)/reliability/results.jsonl
RELIABILITY_SUITES := tests/reliability tests/security/test_security_schemathesis.py tests/ml_core/test_fuzz_validation.py
reliability: $(VENV)/.stamp-test services
	mkdir -p $(dir $(RELIABILITY_RESULTS)) && rm -f $(RELIABILITY_RESULTS)
	RELIABILITY_RESULTS=$(abspath $(RELIABILITY_RESULTS)) $(PY) -m pytest -p tests.reliability.fuzz_counts \
		$(RELIABILITY_SUITES) $(PYTEST_ARGS); rc=$$?; \
	$(PY) scripts/reliability_report.py $(RELIABILITY_RESULTS); exit $$rc
