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

demo: install
	$(BIN)/nanobatch run jobs/example.yaml --simulate --force --report; \
	  code=$$?; echo; echo "Images, results.jsonl, summary.json and report.html are in out/example/"; exit $$code

# Branch coverage with a floor: a change that drops tests for what it adds fails here.
test: install
	$(BIN)/python -m pytest --cov=nanobatch --cov-branch --cov-report=term:skip-covered --cov-fail-under=93

bench: install
	$(BIN)/python bench/run.py

lint: install
	$(BIN)/ruff check nanobatch tests bench
	$(BIN)/mypy

clean:
	rm -rf $(VENV) out build *.egg-info
