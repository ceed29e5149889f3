# Developer and CI tasks. `make test` is what .ci/run runs.
PYTHON ?= python3
VENV ?= .venv

VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# `make demo` has its own venv with the package and the testing and dashboard extras only (the
# demo falls back to the in-process fake Redis when redis-server is not on PATH; with --keep it
# serves the dashboard): no test, lint or docs tools.
DEMO_VENV ?= .venv-demo
DEMO_STAMP := $(DEMO_VENV)/.installed
# `make bench-peers` has its own venv too: the peers (taskiq, dramatiq) pinned in
# benchmarks/peers/requirements.txt, and streamflow from the work tree; never the project's.
PEERS_VENV ?= .venv-peers
PEERS_STAMP := $(PEERS_VENV)/.installed
PEERS_REQUIREMENTS := benchmarks/peers/requirements.txt

.PHONY: venv lint typecheck pytest test-fast docs test demo bench bench-peers screenshots fmt clean distclean

venv: $(STAMP)

# Reinstall whenever pyproject.toml changes; the stamp records the last good install.
$(STAMP): pyproject.toml
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -e '.[test,docs]'
	touch $(STAMP)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: venv
	$(VENV)/bin/mypy

# Two pytest-xdist workers, a test file each at a time (--dist loadfile: a file's tests share
# their module's fixtures and run in order): most tests wait on processes, servers and timers,
# so two at once halve the wall time on 2 cores. PYTEST_WORKERS=0 runs them in this process.
PYTEST_WORKERS ?= 2
pytest: venv
	$(VENV)/bin/pytest -q -n $(PYTEST_WORKERS) --dist loadfile

# The fast suite while you work: everything but the tests marked slow (processes, private
# servers, clusters, a browser, real lease timeouts; see tests/README.md). Under a minute on 2
# shared cores; `make test` still runs every test.
test-fast: venv
	$(VENV)/bin/pytest -q -m "not slow"

# The documentation site into site/; --strict fails on any warning, broken links and anchors
# included. Not --quiet: it drops warnings before strict mode counts them, so a broken link
# would pass. Material for MkDocs prints its end-of-life notice (May 2027) on every build: it is
# left on as the reminder of the plan in docs/contributing.md.
docs: venv
	$(VENV)/bin/mkdocs build --strict

# Sequential on purpose: cheap checks fail first. The line it starts with says how long to expect.
test:
	@echo "make test: venv, lint, docs, type check, then every test: about 10 minutes on 2 shared cores (pytest alone ~8, two test processes; make test-fast: under a minute)."
	$(MAKE) venv
	$(MAKE) lint
	$(MAKE) docs
	$(MAKE) typecheck
	$(MAKE) pytest

$(DEMO_STAMP): pyproject.toml
	test -x $(DEMO_VENV)/bin/python || $(PYTHON) -m venv $(DEMO_VENV)
	$(DEMO_VENV)/bin/python -m pip install -e '.[testing,dashboard]'
	touch $(DEMO_STAMP)

# The streaming DAG demo on a private redis-server; `make demo ARGS=--keep` leaves it running.
demo: $(DEMO_STAMP)
	$(DEMO_VENV)/bin/streamflow demo $(ARGS)

bench: venv
	$(VPY) benchmarks/throughput.py

# The dashboard's pages for docs/dashboard.md, into docs/assets/dashboard/ (about a minute): a
# private redis-server, the demo's workload and headless chromium; pngquant, when installed,
# makes the PNGs about a third the size.
screenshots: venv
	PYTHONPATH=. $(VPY) tools/dashboard_screenshots.py

$(PEERS_STAMP): pyproject.toml $(PEERS_REQUIREMENTS)
	test -x $(PEERS_VENV)/bin/python || $(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/python -m pip install -r $(PEERS_REQUIREMENTS) -e .
	touch $(PEERS_STAMP)

# streamflow against a bare redis-py loop, taskiq and dramatiq on one private redis-server:
# about 8 minutes; `make bench-peers ARGS=--quick` (about 1) or `ARGS=--write` (docs/benchmarks.md).
bench-peers: $(PEERS_STAMP)
	$(PEERS_VENV)/bin/python benchmarks/peers/run.py $(ARGS)

fmt: venv
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf build dist site .pytest_cache .mypy_cache .ruff_cache *.egg-info
	find . \( -path ./$(VENV) -o -path ./$(DEMO_VENV) -o -path ./$(PEERS_VENV) \) -prune \
		-o -name __pycache__ -type d -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) $(DEMO_VENV) $(PEERS_VENV)
