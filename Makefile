# Developer and CI tasks. `make test` is what .ci/run runs.
PYTHON ?= python3
VENV ?= .venv

VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv lint typecheck pytest test demo bench fmt clean distclean

venv: $(STAMP)

# Reinstall whenever pyproject.toml changes; the stamp records the last good install.
$(STAMP): pyproject.toml
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -e '.[test]'
	touch $(STAMP)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: venv
	$(VENV)/bin/mypy

pytest: venv
	$(VENV)/bin/pytest -q

# Sequential on purpose: cheap checks fail first.
test:
	$(MAKE) venv
	$(MAKE) lint
	$(MAKE) typecheck
	$(MAKE) pytest

demo: venv
	$(VENV)/bin/streamflow demo

bench: venv
	$(VPY) benchmarks/throughput.py

fmt: venv
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf build dist site .pytest_cache .mypy_cache .ruff_cache *.egg-info
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
