"""Tuning: which embedding size gives the best model for its size? A KerasTuner search.

The search space is `tune.embedding_dims` (plus `tune.lstm_units` / `dropout` /
`learning_rate` when the config lists them). The vocabulary is adapted once and the
token ids are cached once for all trials, and every trial sees the same batches in
the same order from the same initial seed; each trial early-stops and runs under the
training strategy; the objective is val_accuracy on the validation split carved from
train (the test split is never read here).

Everything lands in `<tune.directory>/<name>/`: the KerasTuner project (`project/`,
resumed on a rerun), `best_hparams.json` (`HyperParameters.get_config()`),
`results.csv` / `results.md` / `results.png`, TensorBoard HParams logs (`logs/`),
`search.json` and the resolved `config.yaml`. `make train TUNED=...` (or
`model.tuned_hparams`) feeds the best values back through `apply_tuned`.

Distributed tuning is KerasTuner's own chief/worker mode, driven by its environment
variables (KERASTUNER_TUNER_ID, KERASTUNER_ORACLE_IP, KERASTUNER_ORACLE_PORT).
"""

from __future__ import annotations

import csv
import functools
import hashlib
import itertools
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import keras
import keras_tuner as kt
import numpy as np
import tensorflow as tf

from pipeline import data as data_mod
from pipeline.config import Config, ConfigError, PipelineError, TuneConfig, from_dict, save_config
from pipeline.distribute import make_strategy
from pipeline.model import build_model, model_kwargs
from pipeline.train import read_json, seed_everything, write_json
from pipeline.vectorize import adapt_vectorizer, batch_ids, vectorize_cached

log = logging.getLogger(__name__)

OBJECTIVE = "val_accuracy"
OPTIONAL_KNOBS = ("lstm_units", "dropout", "learning_rate")  # searched when tune.<knob> lists values
PROJECT = "project"  # the KerasTuner project folder inside the output dir
BEST_FILE = "best_hparams.json"
SEARCH_FILE = "search.json"
LOGS_DIR = "logs"
IDLE_WAIT_S = 0.1  # a worker's pause when the chief has nothing to hand out yet
RUNNING, IDLE, STOPPED = (kt.engine.trial.TrialStatus.RUNNING, kt.engine.trial.TrialStatus.IDLE,
                          kt.engine.trial.TrialStatus.STOPPED)


class TuneError(PipelineError):
    """A search that produced nothing usable; the message says what happened."""


@dataclass(frozen=True)
class TuneResult:
    out_dir: Path
    role: str  # single, chief or worker
    tuner_id: str
    space: dict[str, list]  # searched name -> candidates
    rows: list[dict]  # finished trials among the current candidates, best first (empty on a worker)
    trained: list[dict]  # trials this process ran in this session: trial_id, values, status
    failed: list[dict]  # trials that failed: trial_id, values, message

    @property
    def best(self) -> dict | None:
        return self.rows[0] if self.rows else None


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


def trainable_params(model: keras.Model) -> int:
    return int(sum(np.prod(w.shape) for w in model.trainable_weights))


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
        self.lr_scale = lr_scale

    def build(self, hp: kt.HyperParameters) -> keras.Model:
        keras.utils.set_random_seed(self.cfg.seed)  # every candidate starts from the same draw
        kwargs = model_kwargs(self.cfg.model)
        for name, values in searched(self.cfg.tune).items():
            kwargs[name] = hp.Choice(name, values)
        kwargs["learning_rate"] *= self.lr_scale
        return build_model(self.vocab_size, **kwargs)

    def fit(self, hp: kt.HyperParameters, model: keras.Model, train_batches, *args, **kwargs) -> dict:
        """`train_batches()` gives a fresh shuffle over the shared cache: the same order every trial."""
        t0 = time.perf_counter()
        history = model.fit(train_batches(), *args, **kwargs)
        seconds = time.perf_counter() - t0
        scores = history.history[OBJECTIVE]
        best = int(np.argmax(scores))
        return {
            OBJECTIVE: float(scores[best]),
            "val_loss": float(history.history["val_loss"][best]),
            "best_epoch": history.epoch[best] + 1,
            "epochs_run": len(history.epoch),
            "seconds": seconds,
            "trainable_params": trainable_params(model),
        }


class ResumableGridOracle(kt.Oracle):
    """Grid search that hands out the first candidate without a trial yet.

    KerasTuner 1.4.8's GridSearchOracle keeps its place in the grid in memory only: a
    reloaded search stops early or fails with a KeyError (keras-team/keras-tuner#1055).
    Here the next candidate follows from the values already tried, which the oracle
    saves with its state, so a rerun continues and a longer candidate list extends the
    search. A trial cut off by a kill is rerun first (KerasTuner's retry queue).
    """

    def _untried(self) -> dict | None:
        return next((v for v in grid(self.hyperparameters) if not self._duplicate(v)), None)

    def populate_space(self, trial_id: str) -> dict:
        values = self._untried()
        if values is not None:
            return {"status": RUNNING, "values": values}
        # Like KerasTuner's grid: while other workers' trials run, idle workers wait (so that
        # all of them are told to stop at about the same time and the chief exits promptly).
        return {"status": IDLE if self.ongoing_trials else STOPPED, "values": None}

    def has_work(self) -> bool:
        """Whether a search would train anything (an interrupted trial or an untried candidate)."""
        if self._retry_queue:
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
    d["train"] = {k: v for k, v in d["train"].items() if k not in ("epochs", "monitor", "verbose")}
    space = searched(cfg.tune)
    d["model"] = {k: v for k, v in d["model"].items() if k not in space and k != "tuned_hparams"}
    d["tune"] = {"tuner": cfg.tune.tuner, "epochs": cfg.tune.epochs}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:10]


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
        "status": "running", "session_started": time.strftime("%Y-%m-%dT%H:%M:%S")})


def check_tunable(cfg: Config) -> None:
    if cfg.model.embedding_init != "random":
        raise ConfigError("model.embedding_init: tuning the embedding size needs 'random' "
                          f"(pretrained vectors fix the size; got {cfg.model.embedding_init!r})")


def prepare_data(cfg: Config, strategy: tf.distribute.Strategy
                 ) -> tuple[Callable[[], tf.data.Dataset], tf.data.Dataset, int, dict[str, int]]:
    """Adapt once, vectorize and cache once: (train batches maker, val_ds, vocab size, split sizes).

    Each trial calls the maker for a new shuffle stage over the same cached token ids,
    so every candidate trains on the same batches in the same order.
    """
    raw = data_mod.load_raw(cfg.data, cfg.seed)
    sizes = data_mod.check_nonempty(raw, names=("train", "validation"))  # the test split stays unread
    log.info("data: %s", ", ".join(f"{k} {v}" for k, v in sizes.items()))
    vectorizer = adapt_vectorizer(cfg.vectorize, raw.train)
    replicas = strategy.num_replicas_in_sync
    global_batch = cfg.train.batch_size * replicas
    train_rows = vectorize_cached(raw.train, vectorizer, cfg.vectorize)
    val_ds = batch_ids(vectorize_cached(raw.validation, vectorizer, cfg.vectorize), cfg.vectorize,
                       cfg.train, global_batch, replicas=replicas)
    make_train = functools.partial(batch_ids, train_rows, cfg.vectorize, cfg.train, global_batch,
                                   shuffle_seed=cfg.seed, replicas=replicas)
    return make_train, val_ds, vectorizer.vocabulary_size(), sizes


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


def trial_callbacks(cfg: Config, out: Path) -> list[keras.callbacks.Callback]:
    """Copied for every trial by KerasTuner; it points TensorBoard at logs/<trial>/ and adds HParams."""
    return [
        keras.callbacks.EarlyStopping(monitor=OBJECTIVE, mode="max",
                                      patience=cfg.train.early_stopping_patience),
        keras.callbacks.TensorBoard(str(out / LOGS_DIR), profile_batch=0),
    ]


# --- the search -------------------------------------------------------------------------------


def run_search(cfg: Config, fresh: bool = False) -> TuneResult:
    """Run (or resume) the search of `cfg.tune`; on a chief or single process, write the report."""
    check_tunable(cfg)
    who = role()
    out = output_dir(cfg)
    if who != "worker":
        prepare_output(cfg, out, fresh)
    # The chief trains nothing: it needs no strategy and no data.
    strategy = make_strategy(cfg.distribute) if who != "chief" else None
    seed_everything(cfg)
    replicas = strategy.num_replicas_in_sync if strategy else 1
    lr_scale = replicas if cfg.train.lr_scaling == "linear" else 1.0
    # Until the data is read, the vocabulary size is its upper bound: KerasTuner builds one
    # model up front only to register the search space.
    hypermodel = EmbeddingHyperModel(cfg, cfg.vectorize.max_tokens, lr_scale)
    tuner = make_tuner(cfg, hypermodel, out, strategy)
    verbose = cfg.train.verbose if cfg.train.verbose is not None else (1 if sys.stdout.isatty() else 2)

    if who == "chief":
        log.info("chief: serving the search on %s:%s until the workers have run every trial",
                 os.environ["KERASTUNER_ORACLE_IP"], os.environ["KERASTUNER_ORACLE_PORT"])
        tuner.search(verbose=verbose)  # blocks in KerasTuner's oracle server
    elif who == "worker" or not isinstance(tuner.oracle, ResumableGridOracle) or tuner.oracle.has_work():
        make_train, val_ds, vocab_size, sizes = prepare_data(cfg, strategy)
        hypermodel.vocab_size = vocab_size
        if who == "worker":
            log.info("%s: asking the chief at %s:%s for trials", os.environ["KERASTUNER_TUNER_ID"],
                     os.environ["KERASTUNER_ORACLE_IP"], os.environ["KERASTUNER_ORACLE_PORT"])
        else:
            write_json(out / SEARCH_FILE, read_json(out / SEARCH_FILE) | {
                "data_sizes": sizes, "vocabulary_size": vocab_size,
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


# --- the report -------------------------------------------------------------------------------


def _metric(trial: kt.engine.trial.Trial, name: str) -> float | None:
    return trial.metrics.get_last_value(name) if trial.metrics.exists(name) else None


def _in_space(values: dict, space: dict[str, list]) -> bool:
    names = {k for k in values if not k.startswith("tuner/")}
    return names == set(space) and all(values[k] in space[k] for k in space)


def ranked_rows(oracle: kt.Oracle, space: dict[str, list]) -> list[dict]:
    """One row per finished trial among the current candidates, best first.

    Ranked by val accuracy; a tie goes to the lower val loss, then the smaller model.
    """
    rows = []
    for trial in oracle.trials.values():
        values = trial.hyperparameters.values
        if trial.status != "COMPLETED" or not _in_space(values, space):
            continue
        row = {name: values[name] for name in space}
        row |= {
            "trainable_params": int(_metric(trial, "trainable_params") or 0),
            OBJECTIVE: _metric(trial, OBJECTIVE),
            "val_loss": _metric(trial, "val_loss"),
            "epochs_run": int(_metric(trial, "epochs_run") or 0),
            "best_epoch": int(_metric(trial, "best_epoch") or 0),
            "seconds": round(_metric(trial, "seconds") or 0.0, 1),
            "trial_id": trial.trial_id,
        }
        rows.append(row)
    rows.sort(key=lambda r: (-r[OBJECTIVE], r["val_loss"], r["trainable_params"]))
    return [{"rank": i + 1} | r for i, r in enumerate(rows)]


def failed_trials(oracle: kt.Oracle) -> list[dict]:
    out = []
    for trial in oracle.trials.values():
        if trial.status in ("FAILED", "INVALID"):
            lines = (trial.message or "").strip().splitlines()
            out.append({"trial_id": trial.trial_id, "values": dict(trial.hyperparameters.values),
                        "message": lines[-1] if lines else "no message"})
    return out


def _fmt(column: str, value) -> str:
    if column in (OBJECTIVE, "val_loss"):
        return f"{value:.4f}"
    if column == "seconds":
        return f"{value:.1f}"
    if column == "trainable_params":
        return f"{value:,}"
    return f"{value:g}" if isinstance(value, float) else str(value)


def markdown_table(rows: list[dict]) -> str:
    columns = list(rows[0])
    header = [c.replace("_", " ") for c in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_fmt(c, r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def plot_results(rows: list[dict], out_png: Path) -> None:
    """Val accuracy and trainable parameters against embedding dim (best trial per dim)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best_per_dim: dict[int, dict] = {}
    for r in rows:  # ranked, so the first row of a dim is its best
        best_per_dim.setdefault(r["embedding_dim"], r)
    dims = sorted(best_per_dim)
    acc = [best_per_dim[d][OBJECTIVE] for d in dims]
    params = [best_per_dim[d]["trainable_params"] for d in dims]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(dims, acc, "o-", color="tab:blue", label="val accuracy")
    ax.plot([rows[0]["embedding_dim"]], [rows[0][OBJECTIVE]], "*", color="tab:red", markersize=16,
            label="best")
    ax.set_xscale("log", base=2)
    ax.set_xticks(dims, [str(d) for d in dims])
    ax.minorticks_off()
    ax.set_xlabel("embedding dim")
    ax.set_ylabel("val accuracy (best epoch)", color="tab:blue")
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(dims, params, "s--", color="tab:orange", label="trainable params")
    ax2.set_ylabel("trainable params", color="tab:orange")
    handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], loc="lower right")
    ax.set_title("validation accuracy and model size against embedding dim")
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)


def write_hparams_config(logs: Path, space: dict[str, list]) -> None:
    """The HParams dashboard's experiment: the searched values and the validation metrics (once)."""
    if any(logs.glob("events.out.tfevents*")):
        return
    from tensorboard.plugins.hparams import api as hp_api

    hparams = [hp_api.HParam(name, hp_api.Discrete(values)) for name, values in space.items()]
    metrics = [hp_api.Metric("epoch_accuracy", group="validation", display_name="val accuracy"),
               hp_api.Metric("epoch_loss", group="validation", display_name="val loss")]
    logs.mkdir(parents=True, exist_ok=True)
    with tf.summary.create_file_writer(str(logs)).as_default():
        hp_api.hparams_config(hparams=hparams, metrics=metrics)


def write_report(cfg: Config, oracle: kt.Oracle, result: TuneResult) -> None:
    """results.csv / .md / .png, best_hparams.json, search.json and the HParams experiment."""
    out, rows = result.out_dir, result.rows
    info = read_json(out / SEARCH_FILE)
    info |= {"status": "finished", "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
             "space": result.space, "epochs_per_trial": cfg.tune.epochs,
             "trials": {"finished": len(rows), "failed": len(result.failed),
                        "all": len(oracle.trials), "this_session": len(result.trained)},
             "failed": result.failed, "best": result.best}
    write_json(out / SEARCH_FILE, info)
    write_hparams_config(out / LOGS_DIR, result.space)
    if not rows:
        return
    with (out / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    best = result.best
    chosen = ", ".join(f"{k}={best[k]}" for k in result.space)
    space_text = "; ".join(f"{k} {v}" for k, v in result.space.items())
    (out / "results.md").write_text(
        f"# Tuning {cfg.name}\n\n"
        f"{cfg.tune.tuner} search over {space_text}. Objective: val accuracy on the validation "
        f"split (never the test split), best epoch of each trial; up to {cfg.tune.epochs} epochs "
        f"per trial with early stopping (patience {cfg.train.early_stopping_patience}). Ties go to "
        "the lower val loss, then the smaller model. Seconds: the trial's `fit`.\n\n"
        f"{markdown_table(rows)}\n\n"
        f"Best: **{chosen}** (trial {best['trial_id']}), saved to `{BEST_FILE}`; "
        "`make train TUNED=latest` trains with it.\n")
    plot_results(rows, out / "results.png")
    # Written last: its presence means the report above is complete.
    hps = oracle.trials[best["trial_id"]].hyperparameters
    write_json(out / BEST_FILE, hps.get_config())


def summary(result: TuneResult) -> str:
    """What a person reads at the end: the table, the best value, where the files are."""
    if result.role == "worker":
        ran = ", ".join(f"trial {t['trial_id']} {t['values']} {t['status']}" for t in result.trained)
        return (f"{result.tuner_id}: ran {len(result.trained)} trial(s){': ' + ran if ran else ''}; "
                "the chief writes the report")
    out, best = result.out_dir, result.best
    chosen = ", ".join(f"{k}={best[k]}" for k in result.space)
    counts = f"{len(result.rows)} finished trial(s), " + (
        "run by the workers" if result.role == "chief" else f"{len(result.trained)} trained in this session")
    if result.failed:
        counts += f", {len(result.failed)} failed (see {out / SEARCH_FILE})"
    lines = [
        "", markdown_table(result.rows), "", counts,
        f"best: {chosen}  val_accuracy {best[OBJECTIVE]:.4f}  val_loss {best['val_loss']:.4f}  "
        f"{best['trainable_params']:,} trainable params (trial {best['trial_id']})",
        f"report: {out / 'results.md'}, {out / 'results.csv'}, {out / 'results.png'}",
        f"best hyperparameters: {out / BEST_FILE}  (make train TUNED=latest)",
        f"TensorBoard HParams: tensorboard --logdir {out / LOGS_DIR}",
    ]
    return "\n".join(lines)


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
    d = cfg.to_dict()
    d["model"] |= values | {"tuned_hparams": str(path)}
    tuned = from_dict(d)
    search = read_json(path.parent / SEARCH_FILE)
    provenance = {"source": "tuning", "file": str(path), "values": values,
                  "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    if search.get("best"):
        provenance["search"] = {"tuner": search.get("tuner"), "finished": search.get("finished"),
                                "trial_id": search["best"].get("trial_id"),
                                OBJECTIVE: search["best"].get(OBJECTIVE)}
    log.info("hyperparameters from %s: %s", path, ", ".join(f"{k}={v}" for k, v in values.items()))
    return tuned, provenance
