# Two commands for a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test bench lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# Azurite (Azure Blob Storage's emulator) comes from npm; without npm, the Azure tests are skipped and say so.
AZURITE := .azurite/node_modules/.bin/azurite-blob
$(AZURITE):
	@if command -v npm >/dev/null 2>&1; then \
	  npm install --silent --no-audit --no-fund --prefix .azurite azurite@3; \
	else echo "npm not found: the Azure tests (Azurite) will be skipped" >&2; fi

# The run's last lines say where its images, results and report are.
# Two of the example's items are rejected by the output checks on purpose (see jobs/example.yaml): the run and
# `nanobatch qa` then exit 1, which the demo expects; any other code (2 bad manifest, 3 aborted) fails it.
demo: install
	$(BIN)/nanobatch run jobs/example.yaml --simulate --force --report || [ $$? -eq 1 ]
	$(BIN)/nanobatch qa jobs/example.yaml || [ $$? -eq 1 ]

# Branch coverage with a floor: a change that drops tests for what it adds fails here.
test: install $(AZURITE)
	$(BIN)/python -m pytest --cov=nanobatch --cov-branch --cov-report=term:skip-covered --cov-fail-under=93

$(VENV)/.bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	touch $(VENV)/.bench

bench: $(VENV)/.bench
	$(BIN)/python bench/run.py $(BENCH_ARGS)

lint: install
	$(BIN)/ruff check nanobatch tests bench
	$(BIN)/ruff format --check nanobatch tests bench
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .azurite out build *.egg-info
