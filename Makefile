# Targets read like the README: `make train`, `make tune`, `make test`.
# CONFIG picks a config file; SET overrides single keys: SET="train.epochs=3 model.embedding_dim=64"
CONFIG ?= configs/default.yaml
SET ?=
VENV ?= .venv
PY := $(VENV)/bin/python
SET_ARGS := $(foreach kv,$(SET),--set $(kv))
RUN := $(PY) -m pipeline

.PHONY: install train export tune pretrain all predict bench test lint clean

# Reinstalls only when pyproject.toml changes.
install: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

train: install
	$(RUN) train --config $(CONFIG) $(SET_ARGS) $(ARGS)

export: install
	$(RUN) export --config $(CONFIG) $(SET_ARGS) $(ARGS)

test: install
	$(PY) -m pytest -q $(ARGS)

lint: install
	$(VENV)/bin/ruff check pipeline tests

clean:
	rm -rf runs tuning bench_results .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
