"""Tuning: which embedding size gives the best model for its size? A KerasTuner search.

The search space is `tune.embedding_dims` and `tune.embedding_init` (the embedding starts to
compare, e.g. random against word2vec, each word2vec candidate from vectors of its own
size; unset: `model.embedding_init` alone), plus `tune.lstm_units` / `dropout` /
`learning_rate` when the config lists them. The vocabulary is adapted once and the
token ids are cached once for all trials, and every trial sees the same batches in
the same order from the same initial seed; each trial early-stops and runs under the
training strategy; the objective is val_accuracy on the validation split carved from
train (the test split is never read here).

Everything lands in `<tune.directory>/<name>/`: the KerasTuner project (`project/`,
resumed on a rerun), TensorBoard logs (`logs/`), `search.json`, the resolved
`config.yaml`, and the report that `pipeline/tune_report.py` writes at the end
(`results.*`, `best_hparams.json`). `make train TUNED=...` (or `model.tuned_hparams`)
feeds the best values back through `apply_tuned`.

Distributed tuning is KerasTuner's own chief/worker mode, driven by its environment
variables (KERASTUNER_TUNER_ID, KERASTUNER_ORACLE_IP, KERASTUNER_ORACLE_PORT).
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import keras
import keras_tuner as kt
import numpy as np
import tensorflow as tf

from pipeline import compat, ngrams
from pipeline import data as data_mod
from pipeline.config import Config, TuneConfig, from_dict, save_config
from pipeline.distribute import describe, make_strategy, seed_everything
from pipeline.embeddings import nearest_neighbours, write_projector
from pipeline.errors import ConfigError, PipelineError, stop_signal
from pipeline.fingerprint import data_key, fingerprint
from pipeline.model import build_model, fit_verbosity, model_kwargs, trainable_params
from pipeline.pretrain import embedding_matrix
from pipeline.runs import DirLock, read_json, write_json
from pipeline.scoring import blend_logit, fit_blend, ngram_logits, score_texts
from pipeline.tune_report import (
    BEST_FILE,
    EMBEDDING_DIR,
    LOGS_DIR,
    NEIGHBOURS_FILE,
    OBJECTIVE,
    SEARCH_FILE,
    SERVED,
    TuneResult,
    failed_trials,
    ranked_rows,
    write_report,
)
from pipeline.vectorize import adapt_vectorizer, batch_ids, vectorize_cached

log = logging.getLogger(__name__)

# Searched when tune.<knob> lists values; each is a model.* key.
OPTIONAL_KNOBS = ("embedding_init", "lstm_units", "dropout", "learning_rate")
PROJECT = "project"  # the KerasTuner project folder inside the output dir
IDLE_WAIT_S = 0.1  # a worker's pause when the chief has nothing to hand out yet
RUNNING, IDLE, STOPPED = (kt.engine.trial.TrialStatus.RUNNING, kt.engine.trial.TrialStatus.IDLE,
                          kt.engine.trial.TrialStatus.STOPPED)


class TuneError(PipelineError):
    """A search that produced nothing usable; the message says what happened."""


# --- the search space and the hypermodel ------------------------------------------------------


def searched(tune: TuneConfig) -> dict[str, list]:
    """Searched name -> candidates; the names are `model.*` keys (embedding_dim first)."""
    space: dict[str, list] = {"embedding_dim": list(tune.embedding_dims)}
    for knob in OPTIONAL_KNOBS:
        values = getattr(tune, knob)
        if values:
            space[knob] = list(values)
    return space


def search_space(tune: TuneConfig) -> kt.HyperParameters:
    hp = kt.HyperParameters()
    for name, values in searched(tune).items():
        hp.Choice(name, values)
    return hp


def grid(space: kt.HyperParameters) -> Iterator[dict]:
    """Every combination of the Choice values, in the order the config lists them."""
    names = [p.name for p in space.space]
    for combo in itertools.product(*(list(p.values) for p in space.space)):
        yield dict(zip(names, combo, strict=True))


class EmbeddingHyperModel(kt.HyperModel):
    """The thin adapter: reads the searched values from `hp`, calls the plain builder.

    `fit` reports, besides the objective, what the results table needs (val loss,
    epochs run, seconds, parameter count). They travel as the trial's metrics, so the
    oracle saves them with the trial: they survive a resume and reach a distributed
    chief.
    """

    def __init__(self, cfg: Config, vocab_size: int, lr_scale: float = 1.0):
        super().__init__(name="embedding_lstm")
        self.cfg = cfg
        self.vocab_size = vocab_size  # set to the adapted vocabulary before the search
        self.vocabulary: list[str] | None = None  # set with it; pretrained starts need the words
        self.lr_scale = lr_scale
        self._matrices: dict[tuple[str, int], np.ndarray] = {}
        self.served: ServedValidation | None = None  # set with the data when ngrams.enabled

    def pretrained_matrix(self, init: str, dim: int) -> np.ndarray | None:
        """The embedding start of one candidate: None for random, else vectors of its own size."""
        if init == "random" or self.vocabulary is None:  # no words yet: the space-only build
            return None
        if (init, dim) not in self._matrices:
            d = self.cfg.to_dict()
            d["model"] |= {"embedding_init": init, "embedding_dim": dim}
            self._matrices[(init, dim)] = embedding_matrix(from_dict(d), self.vocabulary)
        return self._matrices[(init, dim)]

    def build(self, hp: kt.HyperParameters) -> keras.Model:
        keras.utils.set_random_seed(self.cfg.seed)  # every candidate starts from the same draw
        kwargs = model_kwargs(self.cfg.model)
        for name, values in searched(self.cfg.tune).items():
            kwargs[name] = hp.Choice(name, values)
        kwargs["learning_rate"] *= self.lr_scale
        init = kwargs.pop("embedding_init", self.cfg.model.embedding_init)
        matrix = self.pretrained_matrix(init, kwargs["embedding_dim"])
        return build_model(self.vocab_size, **kwargs, embedding_matrix=matrix)

    def fit(self, hp: kt.HyperParameters, model: keras.Model, train_batches, *args, **kwargs) -> dict:
        """`train_batches()` gives a fresh shuffle over the shared cache: the same order every trial."""
        t0 = time.perf_counter()
        callbacks = kwargs.get("callbacks") or []
        if self.served is not None:  # first, so the other callbacks and the history see its figure
            kwargs["callbacks"] = [self.served, *callbacks]
        history = model.fit(train_batches(), *args, **kwargs)
        seconds = time.perf_counter() - t0
        self.describe_embedding(model, callbacks)
        scores = history.history[OBJECTIVE]
        best = int(np.argmax(scores))
        served = ({SERVED: float(history.history[SERVED][best])} if SERVED in history.history else {})
        return served | {
            OBJECTIVE: float(scores[best]),
            "val_loss": float(history.history["val_loss"][best]),
            "best_epoch": history.epoch[best] + 1,
            "epochs_run": len(history.epoch),
            "seconds": seconds,
            "trainable_params": trainable_params(model),
        }

    def describe_embedding(self, model: keras.Model, callbacks: list) -> None:
        """Projector files and probe-word neighbours of the trained embedding, in the trial's logs."""
        board = next((c for c in callbacks if isinstance(c, keras.callbacks.TensorBoard)), None)
        if board is None or self.vocabulary is None:
            return
        folder = Path(board.log_dir) / EMBEDDING_DIR  # KerasTuner gives each trial its own log_dir
        weights = model.get_layer("embedding").get_weights()[0]
        write_projector(weights, self.vocabulary, folder)
        write_json(folder / NEIGHBOURS_FILE, nearest_neighbours(weights, self.vocabulary))


class ServedValidation(keras.callbacks.Callback):
    """Each epoch, the validation accuracy of the model as it would be served: the BiLSTM's
    logits blended with a fixed n-gram branch's (`SERVED` in the logs, beside the objective,
    which is the BiLSTM's alone).

    The blend's three weights are fitted on the same validation reviews they are scored on,
    as a run fits them there; with three weights the optimism is small and the same for
    every candidate, so the figure compares sizes, not runs.
    """

    def __init__(self, vectorizer: keras.layers.TextVectorization, max_length: int,
                 validation: tuple[list[str], np.ndarray], ngram_logits: np.ndarray):
        super().__init__()
        self.vectorizer, self.max_length = vectorizer, max_length
        self.texts, self.labels = validation
        self.ngram_logits = ngram_logits

    def __deepcopy__(self, memo):  # KerasTuner copies callbacks per trial; this one holds no state
        return self

    def on_epoch_end(self, epoch, logs=None):
        z_lstm, _ = score_texts(self.vectorizer, self.model, self.texts, self.max_length)
        blend = fit_blend(z_lstm, self.ngram_logits, self.labels)
        served = blend_logit(z_lstm, self.ngram_logits, blend) > 0
        if logs is not None:
            logs[SERVED] = float(np.mean(served == self.labels))


def served_validation(cfg: Config, vectorizer: keras.layers.TextVectorization, raw: data_mod.RawSplits,
                      trial_train: tf.data.Dataset) -> ServedValidation | None:
    """The per-epoch served validation of the trials (None without `ngrams.enabled`): one n-gram
    branch, fitted on the reviews the trials train on, scores the validation reviews once."""
    if not cfg.ngrams.enabled:
        return None
    train_texts, train_labels = data_mod.decoded(trial_train)
    log.info("n-gram branch for the served validation accuracy: fitting on %d reviews",
             len(train_texts))
    branch = ngrams.fit(train_texts, train_labels, cfg.ngrams)
    validation = data_mod.decoded(raw.validation)
    z_ngram = ngram_logits(branch, validation[0])
    return ServedValidation(vectorizer, cfg.vectorize.max_length, validation, z_ngram)


class ResumableGridOracle(kt.Oracle):
    """Grid search that hands out the first candidate without a trial yet.

    KerasTuner 1.4.8's GridSearchOracle keeps its place in the grid in memory only: a
    reloaded search stops early or fails with a KeyError (keras-team/keras-tuner#1055).
    Here the next candidate follows from the values already tried, which the oracle
    saves with its state, so a rerun continues and a longer candidate list extends the
    search. A trial cut off by a kill is rerun first (KerasTuner's retry queue).
    """

    def __init__(self, *args, **kwargs):
        compat.check_tuner_internals()  # the KerasTuner internals read below
        super().__init__(*args, **kwargs)

    def _untried(self) -> dict | None:
        return next((v for v in grid(self.hyperparameters) if not compat.is_duplicate(self, v)), None)

    def populate_space(self, trial_id: str) -> dict:
        values = self._untried()
        if values is not None:
            return {"status": RUNNING, "values": values}
        # Like KerasTuner's grid: while other workers' trials run, idle workers wait (so that
        # all of them are told to stop at about the same time and the chief exits promptly).
        return {"status": IDLE if self.ongoing_trials else STOPPED, "values": None}

    def has_work(self) -> bool:
        """Whether a search would train anything (an interrupted trial or an untried candidate)."""
        if compat.retry_queue(self):
            return True
        if self.max_trials and len(self.trials) >= self.max_trials:
            return False
        return self._untried() is not None


class _SessionMixin:
    """Remembers the trials this process ran, and waits a moment on an IDLE answer.

    KerasTuner asks the oracle again at once when it answers IDLE (other workers'
    trials must finish first, e.g. a Hyperband round); the pause keeps a waiting
    worker from spinning against the chief.
    """

    def __init__(self, *args, **kwargs):
        self.session_trials: list[dict] = []
        self._asked = False
        super().__init__(*args, **kwargs)

    def pre_create_trial(self):
        if self._asked:  # the last answer was IDLE: no trial began since
            time.sleep(IDLE_WAIT_S)
        self._asked = True

    def on_trial_begin(self, trial):
        self._asked = False
        super().on_trial_begin(trial)

    def run_trial(self, trial, *args, **kwargs):
        try:
            return super().run_trial(trial, *args, **kwargs)
        except Exception as exc:
            # Ctrl-C that TensorFlow re-raised as another error: KerasTuner would mark the trial
            # failed and start the next one, so the user's Ctrl-C would be lost.
            if stop_signal() is not None:
                raise KeyboardInterrupt from exc
            raise

    def on_trial_end(self, trial):
        values = {k: v for k, v in trial.hyperparameters.values.items() if not k.startswith("tuner/")}
        self.session_trials.append({"trial_id": trial.trial_id, "values": values,
                                    "status": str(trial.status)})
        if trial.status != "COMPLETED":  # KerasTuner goes on to the next trial without a word
            lines = (trial.message or "").strip().splitlines()
            log.warning("trial %s %s failed: %s", trial.trial_id, values, lines[-1] if lines else "?")
        super().on_trial_end(trial)


class SearchTuner(_SessionMixin, kt.Tuner):
    """A Keras tuner over any oracle (grid, random, bayesian)."""


class HyperbandTuner(_SessionMixin, kt.Hyperband):
    """Hyperband needs its own tuner: it trains in rounds, carrying weights between them."""


# --- roles, output folder, data ---------------------------------------------------------------


def role() -> str:
    """`single`, or `chief` / `worker` when KerasTuner's distributed variables are set."""
    if "KERASTUNER_ORACLE_IP" not in os.environ:
        return "single"
    for var in ("KERASTUNER_ORACLE_PORT", "KERASTUNER_TUNER_ID"):
        if not os.environ.get(var):
            raise ConfigError(f"{var}: required when KERASTUNER_ORACLE_IP is set")
    # KerasTuner's own rule: an id containing "chief" is the chief.
    return "chief" if "chief" in os.environ["KERASTUNER_TUNER_ID"] else "worker"


def set_role(kind: str, host: str, port: int, tuner_id: str | None = None) -> None:
    """Set KerasTuner's environment: a chief serves host:port, a worker connects to it."""
    if kind == "worker" and (not tuner_id or "chief" in tuner_id):
        raise ConfigError(f"--tuner-id: a worker needs a unique name without 'chief' (got {tuner_id!r})")
    os.environ["KERASTUNER_ORACLE_IP"] = host
    os.environ["KERASTUNER_ORACLE_PORT"] = str(port)
    os.environ["KERASTUNER_TUNER_ID"] = "chief" if kind == "chief" else str(tuner_id)


def output_dir(cfg: Config) -> Path:
    return Path(cfg.tune.directory) / cfg.name


def search_fingerprint(cfg: Config) -> str:
    """Hash of what shapes a trial's score; the candidate lists stay out so that they can grow."""
    d = cfg.to_dict()
    for key in ("runs_dir", "export", "distribute", "pretrain", "tune"):
        d.pop(key)
    d["data"] = data_key(d["data"])
    if cfg.data.source == "files":  # files are edited in place: a search on older rows is stale
        d["data_identity"] = data_mod.data_identity(cfg.data)
    d["train"] = {k: v for k, v in d["train"].items() if k not in ("epochs", "monitor", "verbose")}
    space = searched(cfg.tune)
    d["model"] = {k: v for k, v in d["model"].items() if k not in space and k != "tuned_hparams"}
    d["tune"] = {"tuner": cfg.tune.tuner, "epochs": cfg.tune.epochs,
                 "max_train_examples": cfg.tune.max_train_examples}
    if "word2vec" in trial_inits(cfg):  # the vectors shape the scores
        d["pretrain"] = cfg.pretrain.model_dump(include={"vector_size", "window", "min_count", "epochs"})
    return fingerprint(d)


def prepare_output(cfg: Config, out: Path, fresh: bool) -> None:
    """Start over (`fresh`), or check that an existing search was made with the same settings."""
    fingerprint = search_fingerprint(cfg)
    if fresh and out.exists():
        log.info("--fresh: removing the earlier search in %s", out)
        shutil.rmtree(out)
    if (out / PROJECT).exists() and read_json(out / SEARCH_FILE).get("fingerprint") != fingerprint:
        raise ConfigError(
            f"tune: {out} holds a search made with other settings (data, vectorize, model, train, "
            "seed, tune.tuner or tune.epochs differ): rerun with --fresh to start over, or set "
            "another tune.directory")
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    write_json(out / SEARCH_FILE, read_json(out / SEARCH_FILE) | {
        "name": cfg.name, "fingerprint": fingerprint, "tuner": cfg.tune.tuner, "objective": OBJECTIVE,
        "word2vec_vector_size": cfg.pretrain.vector_size,
        "status": "running", "session_started": time.strftime("%Y-%m-%dT%H:%M:%S")})


def trial_inits(cfg: Config) -> list[str]:
    return list(cfg.tune.embedding_init or [cfg.model.embedding_init])


def check_tunable(cfg: Config) -> None:
    init = cfg.model.embedding_init
    if not cfg.tune.embedding_init and init not in ("random", "word2vec"):
        raise ConfigError(
            f"model.embedding_init: {init!r} fixes the embedding size (a vectors file or language "
            "models of one size); search with tune.embedding_init=[word2vec] (vectors of each size) "
            "or [random]")
    size, largest = cfg.pretrain.vector_size, max(cfg.tune.embedding_dims)
    if "word2vec" in trial_inits(cfg) and size and size < largest:
        raise ConfigError(f"pretrain.vector_size: {size}-d word2vec vectors cannot start the "
                          f"{largest}-d candidate (leave it unset, or set it to at least {largest})")


def with_search_vectors(cfg: Config) -> Config:
    """`cfg` with the word2vec size the search starts every candidate from (the largest one).

    Saved in search.json; `apply_tuned` sets it for the final run, so the chosen size
    trains from the very vectors it was chosen with.
    """
    if "word2vec" not in trial_inits(cfg) or cfg.pretrain.vector_size:
        return cfg
    d = cfg.to_dict()
    d["pretrain"]["vector_size"] = max(cfg.tune.embedding_dims)
    return from_dict(d)


def prepare_data(cfg: Config, strategy: tf.distribute.Strategy
                 ) -> tuple[Callable[[], tf.data.Dataset], tf.data.Dataset, list[str], dict[str, int],
                            ServedValidation | None]:
    """Adapt once, vectorize and cache once: (train batches maker, val_ds, vocabulary, split
    sizes, the served validation callback).

    Each trial calls the maker for a new shuffle stage over the same cached token ids,
    so every candidate trains on the same batches in the same order.
    """
    raw = data_mod.load_raw(cfg.data, cfg.seed)
    sizes = data_mod.check_nonempty(raw, names=("train", "validation"))  # the test split stays unread
    log.info("data: %s", ", ".join(f"{k} {v}" for k, v in sizes.items()))
    vectorizer = adapt_vectorizer(cfg.vectorize, raw.train)
    replicas = strategy.num_replicas_in_sync
    global_batch = cfg.train.batch_size * replicas
    trial_train = raw.train.take(cfg.tune.max_train_examples) if cfg.tune.max_train_examples else raw.train
    if cfg.tune.max_train_examples:
        sizes["train_per_trial"] = data_mod.count(trial_train)
    train_rows = vectorize_cached(trial_train, vectorizer, cfg.vectorize)
    val_ds = batch_ids(vectorize_cached(raw.validation, vectorizer, cfg.vectorize), cfg.vectorize,
                       cfg.train, global_batch, replicas=replicas)
    make_train = functools.partial(batch_ids, train_rows, cfg.vectorize, cfg.train, global_batch,
                                   shuffle_seed=cfg.seed, replicas=replicas)
    served = served_validation(cfg, vectorizer, raw, trial_train)
    return make_train, val_ds, vectorizer.get_vocabulary(), sizes, served


def make_tuner(cfg: Config, hypermodel: EmbeddingHyperModel, out: Path,
               strategy: tf.distribute.Strategy | None) -> kt.Tuner:
    """The tuner named by `tune.tuner`, reloading the project in `out` if there is one."""
    space = search_space(cfg.tune)
    objective = kt.Objective(OBJECTIVE, direction="max")
    common = dict(hypermodel=hypermodel, distribution_strategy=strategy, directory=str(out),
                  project_name=PROJECT, overwrite=False)
    if cfg.tune.tuner == "hyperband":
        tuner = HyperbandTuner(objective=objective, max_epochs=cfg.tune.epochs, seed=cfg.seed,
                               hyperparameters=space, **common)
    else:
        # random and bayesian need a trial budget: the grid's size unless the config gives one.
        budget = cfg.tune.max_trials or (None if cfg.tune.tuner == "grid" else sum(1 for _ in grid(space)))
        oracle_cls = {"grid": ResumableGridOracle, "random": kt.oracles.RandomSearchOracle,
                      "bayesian": kt.oracles.BayesianOptimizationOracle}[cfg.tune.tuner]
        oracle = oracle_cls(objective=objective, max_trials=budget, seed=cfg.seed, hyperparameters=space)
        tuner = SearchTuner(oracle=oracle, **common)
    if role() != "worker":
        # A reloaded project keeps the space it was saved with; the config's candidates win,
        # so adding one extends the search.
        tuner.oracle.hyperparameters = space.copy()
    return tuner


def trials_to_run(oracle: kt.Oracle) -> int | None:
    """How many trials a search of `oracle` will still train; None where the tuner decides
    as it goes (Hyperband's rounds)."""
    rerun = len(compat.retry_queue(oracle))  # cut off by a kill or Ctrl-C: trained again first
    room = oracle.max_trials - len(oracle.trials) if oracle.max_trials else None
    if isinstance(oracle, ResumableGridOracle):
        untried = sum(1 for v in grid(oracle.hyperparameters) if not compat.is_duplicate(oracle, v))
        return rerun + (untried if room is None else min(untried, max(room, 0)))
    if isinstance(oracle, kt.oracles.HyperbandOracle) or room is None:
        return None
    return rerun + max(room, 0)


def log_resume(oracle: kt.Oracle, out: Path) -> None:
    """On a search reloaded from `out`: how many finished trials it keeps, how many it will run."""
    if not oracle.trials:
        return
    kept = sum(1 for t in oracle.trials.values() if t.status == "COMPLETED")
    failed = sum(1 for t in oracle.trials.values() if t.status in ("FAILED", "INVALID"))
    to_run = trials_to_run(oracle)
    log.info("resuming the search in %s: %d finished trial(s) kept%s, %s to run", out / PROJECT, kept,
             f" ({failed} failed, not retried)" if failed else "",
             "as many as Hyperband's rounds need" if to_run is None else f"{to_run} trial(s)")


def trial_callbacks(cfg: Config, out: Path) -> list[keras.callbacks.Callback]:
    """Copied for every trial by KerasTuner; it points TensorBoard at logs/<trial>/ and adds HParams."""
    return [
        keras.callbacks.EarlyStopping(monitor=OBJECTIVE, mode="max",
                                      patience=cfg.train.early_stopping_patience),
        keras.callbacks.TensorBoard(str(out / LOGS_DIR), profile_batch=0),
    ]


# --- the search -------------------------------------------------------------------------------


def run_search(cfg: Config, fresh: bool = False) -> TuneResult:
    """Run (or resume) the search of `cfg.tune`; on a chief or single process, write the report.

    One live process owns a tuning folder (its workers aside): a second one stops with
    RunBusyError. The lock sits beside the folder, so that --fresh can remove the folder.
    """
    out = output_dir(cfg)
    if role() == "worker":
        return _run_search(cfg, fresh)
    with DirLock(out.parent / f".{out.name}.lock", f"tuning folder {out}"):
        return _run_search(cfg, fresh)


def _run_search(cfg: Config, fresh: bool) -> TuneResult:
    check_tunable(cfg)
    cfg = with_search_vectors(cfg)
    who = role()
    out = output_dir(cfg)
    if who != "worker":
        prepare_output(cfg, out, fresh)
    # The chief trains nothing: it needs no strategy and no data.
    strategy = make_strategy(cfg.distribute) if who != "chief" else None
    if strategy is not None:
        log.info("trials train on %s", describe(strategy))
    seed_everything(cfg)
    replicas = strategy.num_replicas_in_sync if strategy else 1
    lr_scale = replicas if cfg.train.lr_scaling == "linear" else 1.0
    # Until the data is read, the vocabulary size is its upper bound: KerasTuner builds one
    # model up front only to register the search space.
    hypermodel = EmbeddingHyperModel(cfg, cfg.vectorize.max_tokens, lr_scale)
    tuner = make_tuner(cfg, hypermodel, out, strategy)
    verbose = fit_verbosity(cfg.train.verbose)
    if who != "worker":
        log_resume(tuner.oracle, out)

    if who == "chief":
        log.info("chief: serving the search on %s:%s until the workers have run every trial",
                 os.environ["KERASTUNER_ORACLE_IP"], os.environ["KERASTUNER_ORACLE_PORT"])
        tuner.search(verbose=verbose)  # blocks in KerasTuner's oracle server
    elif who == "worker" or not isinstance(tuner.oracle, ResumableGridOracle) or tuner.oracle.has_work():
        make_train, val_ds, vocabulary, sizes, hypermodel.served = prepare_data(cfg, strategy)
        hypermodel.vocabulary, hypermodel.vocab_size = vocabulary, len(vocabulary)
        if who == "worker":
            log.info("%s: asking the chief at %s:%s for trials", os.environ["KERASTUNER_TUNER_ID"],
                     os.environ["KERASTUNER_ORACLE_IP"], os.environ["KERASTUNER_ORACLE_PORT"])
        else:
            write_json(out / SEARCH_FILE, read_json(out / SEARCH_FILE) | {
                "data_sizes": sizes, "vocabulary_size": len(vocabulary),
                "strategy": type(strategy).__name__, "replicas": replicas})
        tuner.search(make_train, validation_data=val_ds, epochs=cfg.tune.epochs,
                     callbacks=trial_callbacks(cfg, out), verbose=verbose)
    else:
        log.info("every candidate already has a finished trial in %s: nothing to train", out / PROJECT)

    space = searched(cfg.tune)
    tuner_id = tuner.tuner_id
    if who == "worker":
        record = {"tuner_id": tuner_id, "trained": tuner.session_trials,
                  "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
        (out / "workers").mkdir(parents=True, exist_ok=True)
        write_json(out / "workers" / f"{tuner_id}.json", record)
        return TuneResult(out, who, tuner_id, space, [], tuner.session_trials, [])

    rows = ranked_rows(tuner.oracle, space)
    failed = failed_trials(tuner.oracle)
    result = TuneResult(out, who, tuner_id, space, rows, tuner.session_trials, failed)
    write_report(cfg, tuner.oracle, result)
    if not rows:
        detail = f"; the first failure: {failed[0]['message']}" if failed else ""
        raise TuneError(f"no trial finished in {out / PROJECT}{detail}")
    return result


# --- hand-off to training ---------------------------------------------------------------------


def tuned_path(cfg: Config, source: str) -> Path:
    """`latest` -> this config name's best_hparams.json; a folder -> the file in it; else the path."""
    if source == "latest":
        return output_dir(cfg) / BEST_FILE
    path = Path(source)
    return path / BEST_FILE if path.is_dir() else path


def apply_tuned(cfg: Config) -> tuple[Config, dict]:
    """`cfg` with the tuned values of `model.tuned_hparams` applied, and where they came from."""
    source = cfg.model.tuned_hparams or "latest"
    path = tuned_path(cfg, source)
    if not path.is_file():
        raise TuneError(f"model.tuned_hparams: no tuning result at {path}: run `make tune` "
                       "with the same config first, or pass the path of a best_hparams.json")
    try:
        hps = kt.HyperParameters.from_config(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"model.tuned_hparams: {path} is not a best_hparams.json "
                          f"(HyperParameters.get_config() form): {exc}") from None
    values = {k: v for k, v in hps.values.items() if k == "embedding_dim" or k in OPTIONAL_KNOBS}
    if not values:
        raise ConfigError(f"model.tuned_hparams: {path} holds no model hyperparameters "
                          f"(found {sorted(hps.values)})")
    search = read_json(path.parent / SEARCH_FILE)
    d = cfg.to_dict()
    d["model"] |= values | {"tuned_hparams": str(path)}
    if d["model"]["embedding_init"] == "word2vec" and search.get("word2vec_vector_size"):
        # The vectors the chosen size was scored with (the search's largest size, reduced).
        d["pretrain"]["vector_size"] = search["word2vec_vector_size"]
    tuned = from_dict(d)
    provenance = {"source": "tuning", "file": str(path), "values": values,
                  "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    if search.get("best"):
        provenance["search"] = {"tuner": search.get("tuner"), "finished": search.get("finished"),
                                "trial_id": search["best"].get("trial_id"),
                                OBJECTIVE: search["best"].get(OBJECTIVE)}
    log.info("hyperparameters from %s: %s", path, ", ".join(f"{k}={v}" for k, v in values.items()))
    return tuned, provenance
