# consul-renderer: every target sets up what it needs first, and a second run downloads nothing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
TOOLS  := .tools
STAMP  := $(VENV)/.installed
LINT_DIRS := renderer lab tests scripts $(wildcard bench)

.PHONY: setup tools bench-tools test lint typecheck check-docker demo demo-cluster bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Re-install only when the project metadata changed.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

tools: $(STAMP)
	$(BIN)/python scripts/fetch_consul.py $(TOOLS)

setup: $(STAMP) tools

lint: setup
	$(BIN)/ruff check $(LINT_DIRS)
	$(BIN)/ruff format --check $(LINT_DIRS)

typecheck: setup
	$(BIN)/mypy renderer lab bench

check-docker: setup
	$(BIN)/python scripts/check_docker.py

test: setup lint typecheck check-docker
	PATH="$(CURDIR)/$(TOOLS)/bin:$$PATH" $(BIN)/pytest $(PYTEST_ARGS)

demo: setup
	PATH="$(CURDIR)/$(TOOLS)/bin:$$PATH" $(BIN)/python -m lab.demo $(DEMO_ARGS)

# The production topology in network namespaces (root): 3 Consul servers, 2 load balancers, 3 web hosts.
demo-cluster: setup
	PATH="$(CURDIR)/$(TOOLS)/bin:$$PATH" $(BIN)/python -m lab.cluster_demo $(DEMO_ARGS)

# The bench's load generator (optional: without it the bench uses its Python load).
bench-tools: $(STAMP)
	$(BIN)/python scripts/fetch_wrk.py $(TOOLS)

bench: setup bench-tools
	PATH="$(CURDIR)/$(TOOLS)/bin:$$PATH" $(BIN)/python -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(TOOLS) .run .pytest_cache .mypy_cache .ruff_cache
