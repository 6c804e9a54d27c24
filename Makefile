# The two commands of the README's quick start: `make demo` and `make test`.
# Each creates .venv from PyPI on first use; nothing else needs to be installed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint typecheck docs pytest test-pythons bench compat compat-report clean clean-pythons

demo: $(VENV)/.installed-demo
	$(BIN)/python -m trio_fork demo
	$(BIN)/python -m trio_fork bench --quick

test: lint typecheck docs pytest

lint: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(VENV)/.installed-test
	$(BIN)/mypy

docs: $(VENV)/.installed-test
	$(BIN)/sphinx-build -q -W --keep-going -b html docs docs/_build/html

pytest: $(VENV)/.installed-test
	$(BIN)/pytest

# The tests on CPython 3.12 to 3.15 besides this one; needs root and debootstrap, and
# keeps what it builds in ~/.cache/trio_fork-pythons (minutes the first time). See .ci/pythons.
test-pythons:
	bash .ci/pythons

# The full benchmark (a few minutes); see bench/README.md.
bench: $(VENV)/.installed-demo
	mkdir -p bench/results
	$(BIN)/python -m trio_fork bench --json bench/results/bench.json \
		--plot bench/results/spawn-rate.png > bench/results/table.txt
	cat bench/results/table.txt

# The peers' own test suites (trio-parallel's, anyio's to_process) against trio_fork;
# see tests/compat/run.py. compat-report runs the internals tests too, lists every
# failure and exits 0.
compat: $(VENV)/.installed-compat
	$(BIN)/python tests/compat/run.py

compat-report: $(VENV)/.installed-compat
	$(BIN)/python tests/compat/run.py --report

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed-demo: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[bench]'
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test,bench]'
	touch $@ $(VENV)/.installed-demo

$(VENV)/.installed-compat: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test,bench,compat]'
	touch $@ $(VENV)/.installed-test $(VENV)/.installed-demo

clean:
	rm -rf $(VENV) docs/_build .mypy_cache .pytest_cache .ruff_cache .compat-cache

# What test-pythons built (root filesystems, venvs, logs), in ~/.cache/trio_fork-pythons.
clean-pythons:
	bash .ci/pythons --clean
