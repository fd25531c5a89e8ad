# Targets read like the README: `make train`, `make test`, `make predict`, `make tune`, `make docs`.
# CONFIG picks a config file; SET overrides single keys: SET="train.epochs=3 model.embedding_dim=64"
CONFIG ?= configs/default.yaml
SET ?=
VENV ?= .venv
PY := $(VENV)/bin/python
SET_ARGS := $(foreach kv,$(SET),--set $(kv))
RUN := $(PY) -m pipeline

.PHONY: install train train-multiworker export tune tune-chief tune-worker pretrain all predict evaluate \
	bench bench-tables results gpu-check test test-all test-slow docs lint clean

# Reinstalls only when pyproject.toml changes.
install: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

# TUNED=latest (or a best_hparams.json) trains with the best values of `make tune`.
train: install
	$(RUN) train --config $(CONFIG) $(SET_ARGS) $(if $(TUNED),--tuned $(TUNED)) $(ARGS)

# WORKERS training processes on this machine under MultiWorkerMirroredStrategy, each with its
# own TF_CONFIG on a free 127.0.0.1 port; to try multi-worker before using several machines (docs/distributed.md).
WORKERS ?= 2
train-multiworker: install
	$(RUN) train-workers --workers $(WORKERS) --config $(CONFIG) $(SET_ARGS) $(ARGS)

# Search the embedding size (tune.* in the config); a rerun resumes, ARGS=--fresh starts over.
tune: install
	$(RUN) tune --config $(CONFIG) $(SET_ARGS) $(ARGS)

# Tune, then train (and export) with the best values found.
all: tune
	$(MAKE) --no-print-directory train TUNED=latest

# Distributed tuning: one chief (ORACLE=0.0.0.0:8000 on its machine), workers pointing at it
# (ORACLE=chief-host:8000 TUNER_ID=tuner1, tuner2, ...), all with the same CONFIG and SET.
ORACLE ?= 127.0.0.1:8000
tune-chief: install
	$(RUN) tune --config $(CONFIG) $(SET_ARGS) --chief $(ORACLE) $(ARGS)

tune-worker: install
	$(RUN) tune --config $(CONFIG) $(SET_ARGS) --worker $(ORACLE) --tuner-id $(TUNER_ID) $(ARGS)

export: install
	$(RUN) export --config $(CONFIG) $(SET_ARGS) $(ARGS)

# make predict TEXT="A wonderful film."  or  cat reviews.txt | make predict  (MODEL=saved_models/<name>[/<N>])
predict: install
	$(RUN) predict --config $(CONFIG) $(SET_ARGS) $(if $(MODEL),--model $(MODEL)) $(ARGS) \
		$(if $(TEXT),-- '$(subst ','\'',$(TEXT))')

# make evaluate DATA=reviews.csv  (or DATA=tfds:imdb_reviews:test; MODEL=saved_models/<name>[/<N>],
# default the config's; ARGS="--slice-by product --against saved_models/imdb_lstm/2"): docs/evaluate.md
evaluate: install
	$(RUN) evaluate --config $(CONFIG) $(SET_ARGS) $(if $(MODEL),--model $(MODEL)) --data '$(DATA)' $(ARGS)

pretrain: install
	$(RUN) pretrain --config $(CONFIG) $(SET_ARGS) $(ARGS)

# Both sides of the speed comparison in one run; needs the real data (TFDS_DATA_DIR).
bench: install
	$(RUN) bench --config $(CONFIG) $(SET_ARGS) $(ARGS)

# What checking a user's files costs: a 1 GiB CSV and a million short rows (scratch files, removed after).
bench-tables: install
	$(RUN) bench-tables $(ARGS)

# RESULTS.md from the finished runs' records (runs/<name>/) and the linear peer's
# (imdb-pipeline bench --peer-only --train-examples 0 --test-examples 0 writes it).
results: install
	$(RUN) results --config $(CONFIG) $(SET_ARGS) $(ARGS)

# On a GPU machine: cuDNN use, seconds per epoch (mixed precision off/on), export served with GPUs
# hidden (docs/gpu.md). Times configs/gpu.yaml unless CONFIG is given; without a GPU, one line.
gpu-check: install
	$(RUN) gpu-check --config $(if $(filter command line environment,$(origin CONFIG)),$(CONFIG),configs/gpu.yaml) \
		$(SET_ARGS) $(ARGS)

# Every tier runs on TEST_WORKERS pytest-xdist processes (TEST_WORKERS=0: in this one); the tests
# sharing a trained fixture stay in one worker (tests/conftest.py), so it is built once.
TEST_WORKERS ?= 2
XDIST := -n $(TEST_WORKERS) --dist loadgroup

# The fast tier (under 3 minutes on 2 cores): every test but those marked slow.
test: install
	$(PY) -m pytest -q -m "not slow" $(XDIST) $(ARGS)

# Everything, the slow multi-process tests included (meant to take under 10 minutes on 2 cores).
test-all: install
	$(PY) -m pytest -q $(XDIST) $(ARGS)

# Only the tests marked slow: after `make test`, what CI runs, so that every test runs once.
test-slow: install
	$(PY) -m pytest -q -m slow $(XDIST) $(ARGS)

# Regenerate docs/config.md from the config models (tests/test_docs.py checks it is current).
docs: install
	$(PY) -m pipeline.docs

lint: install
	$(VENV)/bin/ruff check pipeline tests

clean:
	rm -rf runs tuning bench_results evaluation .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
