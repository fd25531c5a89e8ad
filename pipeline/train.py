"""The training spine: data -> vectorize -> model -> fit -> n-gram branch -> evaluate -> export.

`train(cfg)` reads top to bottom in that order. The bookkeeping (the run directory and
its lock, the run record, the resume state) lives in `pipeline.runs`; each run has its
own directory `runs/<name>/<time>-<fingerprint>/` holding the resolved config,
vocabulary, checkpoints, history, TensorBoard logs, metrics and export record.

A rerun of the same config resumes its newest unfinished run (unless `fresh=True`):
from the last completed epoch while it was training, at the evaluation and export once
training had finished. Tuned hyperparameters arrive already applied to `cfg`
(`pipeline.tune.apply_tuned`, called by the CLI); `provenance` records where they came from.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import logging
import resource
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from pipeline import data as data_mod
from pipeline import ngrams
from pipeline.compat import fix_keras_multi_worker
from pipeline.config import Config, load_config, save_config
from pipeline.constants import THRESHOLD
from pipeline.distribute import (
    WorkerBackupAndRestore,
    gather_from_workers,
    is_chief,
    make_strategy,
    num_workers,
    shard_by_data,
    strategy_name,
    task_name,
)
from pipeline.embeddings import write_projector
from pipeline.export import (
    ExportResult,
    check_texts,
    check_writable,
    export_model,
    save_result,
    score_texts,
    served_probabilities,
    sigmoid,
)
from pipeline.model import PretrainedSchedule, build_model, model_kwargs
from pipeline.pretrain import initial_weights
from pipeline.runs import (
    BACKUP_DIR,
    BEST_FILE,
    CONFIG_FILE,
    CURVES_FILE,
    EXPORT_FILE,
    HISTORY_FILE,
    METRICS_FILE,
    NGRAMS_FILE,
    SEED_STATE_FILE,
    VOCAB_FILE,
    WEIGHTS_FILE,
    ResumableEarlyStopping,
    Run,
    SeedStateBackup,
    best_so_far,
    open_run,
    open_worker_run,
    restored_epoch,
    run_fingerprint,
    seed_everything,
    tidy_history,
    write_json,
)
from pipeline.vectorize import (
    adapt_vectorizer,
    load_vocabulary,
    make_vectorizer,
    save_vocabulary,
    vectorize_split,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunResult:
    run_dir: Path
    metrics: dict
    export: ExportResult | None
    chief: bool = True  # False: a multi-worker helper; the chief holds the run, run_dir is gone


def train(cfg: Config, fresh: bool = False, export: bool = True,
          provenance: dict | None = None) -> RunResult:
    """Run the whole pipeline for one config; returns the run dir, test metrics and export.

    `provenance`: where tuned hyperparameters came from (`tune.apply_tuned`'s second value);
    required when `cfg.model.tuned_hparams` is set, recorded in run.json.
    """
    if cfg.model.tuned_hparams and provenance is None:
        raise ValueError("cfg.model.tuned_hparams is set: resolve it with pipeline.tune.apply_tuned "
                         "first and pass its provenance")
    t0 = time.time()
    strategy = make_strategy(cfg.distribute)  # first: multi-worker must set up before any TF op
    seed_everything(cfg)
    multi_worker = isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
    chief = not multi_worker or is_chief()
    if export and chief:
        check_writable(cfg)  # an export folder that cannot be written fails now, not after training

    # Data: read through (a damaged file is named) before anything is written under runs/.
    raw = data_mod.load_raw(cfg.data, cfg.seed)
    sizes = data_mod.check_nonempty(raw)
    log.info("data: %s", ", ".join(f"{k} {v}" for k, v in sizes.items()))
    fingerprint = run_fingerprint(cfg, data_mod.data_identity(cfg.data))

    # Only the chief writes the run; other workers write to a scratch dir deleted at the end.
    # Leaving the `with` releases the run's lock; a PipelineError while training marks it failed.
    run = open_run(cfg, fingerprint, fresh) if chief else open_worker_run(cfg, fingerprint,
                                                                          task_name(), fresh)
    with run:
        log.info("%s %s in %s", "resuming" if run.resumed else "new",
                 "run" if chief else f"{task_name()} scratch dir", run.dir)
        save_config(cfg, run.dir / CONFIG_FILE)
        run.update(hyperparameters_from=provenance or {"source": "config"}, data_sizes=sizes,
                   labels=list(raw.labels),  # [label 0, label 1 (positive)]: export and predict name them
                   strategy=strategy_name(strategy), replicas=strategy.num_replicas_in_sync,
                   workers=num_workers() if multi_worker else 1)

        # Vectorize: the vocabulary is adapted once per run and reloaded on a resume.
        vectorizer = run_vectorizer(cfg, raw.train, sizes["train"], run)
        vocabulary = vectorizer.get_vocabulary()
        log.info("vocabulary: %d tokens", len(vocabulary))
        if multi_worker:
            check_same_vocabulary(strategy, vocabulary)
        replicas = strategy.num_replicas_in_sync
        global_batch = cfg.train.batch_size * replicas
        train_ds = vectorize_split(raw.train, vectorizer, cfg.vectorize, cfg.train, global_batch,
                                   shuffle_seed=cfg.seed, replicas=replicas)
        val_ds = vectorize_split(raw.validation, vectorizer, cfg.vectorize, cfg.train, global_batch,
                                 replicas=replicas)
        train_ds, val_ds = shard_by_data(train_ds), shard_by_data(val_ds)

        # Model: only construction and compile belong in the strategy's scope.
        lr = cfg.model.learning_rate * (replicas if cfg.train.lr_scaling == "linear" else 1)
        # word2vec, a vectors file or language models; a trained run's saved weights replace
        # any start, so it needs none (nor the minutes of pretraining a missing cache would cost).
        pretrained = {} if run.status == "trained" else initial_weights(cfg, vocabulary)
        with strategy.scope():
            model = build_model(len(vocabulary), **(model_kwargs(cfg.model) | {"learning_rate": lr}),
                                **pretrained)
        fix_keras_multi_worker(model, strategy)  # a no-op unless multi-worker
        run.update(global_batch=global_batch, learning_rate=lr,
                   trainable_params=int(sum(np.prod(w.shape) for w in model.trainable_weights)))

        # Fit, unless an earlier session of this run got through it.
        t_fit = time.time()
        if training_finished(run, strategy):
            log.info("training finished in an earlier session; resuming at the evaluation")
        else:
            history = fit(cfg, model, train_ds, val_ds, run, strategy)
            run.update(epochs_run_this_session=len(history.epoch))
        if not chief:
            # The chief has the same weights; its evaluation and export take no collective
            # steps, so this worker is no longer needed.
            shutil.rmtree(run.dir, ignore_errors=True)
            log.info("%s finished training; the chief writes the run", task_name())
            return RunResult(run.dir, {}, None, chief=False)
        keep_best_weights(model, run)
        write_projector(model.get_layer("embedding").get_weights()[0], vocabulary,
                        run.dir / "tensorboard" / "embedding")
        run.update(fit_seconds_this_session=round(time.time() - t_fit, 1))

        # The n-gram branch, evaluation and export: a rerun after an interruption from here on
        # starts here again (a fitted branch is reloaded). Test is scored by the chief alone,
        # on the reviews as they are served, so every review counts.
        ngram = ngram_branch(cfg, raw, vectorizer, model, run) if cfg.ngrams.enabled else None
        log.info("evaluating on %d test reviews", sizes["test"])
        metrics = evaluate(vectorizer, model, raw.test, cfg.vectorize.max_length, ngram)
        metrics["confusion_matrix"]["labels"] = list(raw.labels)
        write_json(run.dir / METRICS_FILE, metrics)
        result = None
        if export:
            result = export_model(vectorizer, model, cfg, check_texts(raw.test), ngram, raw.labels)
            save_result(result, run.dir / EXPORT_FILE)
        run.update(status="finished", total_seconds_this_session=round(time.time() - t0, 1),
                   peak_rss_mib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1))
        return RunResult(run.dir, metrics, result)


# --- the steps of the spine ---------------------------------------------------------------------


def run_vectorizer(cfg: Config, raw_train: tf.data.Dataset, n_train: int, run: Run
                   ) -> keras.layers.TextVectorization:
    """The run's vectorizer: adapted on the training reviews, or its saved vocabulary on a resume."""
    vocab_path = run.dir / VOCAB_FILE
    if run.resumed and vocab_path.is_file():
        return make_vectorizer(cfg.vectorize, load_vocabulary(vocab_path))
    log.info("adapting the vocabulary on %d training reviews", n_train)
    vectorizer = adapt_vectorizer(cfg.vectorize, raw_train)
    save_vocabulary(vectorizer, vocab_path)
    return vectorizer


def check_same_vocabulary(strategy: tf.distribute.Strategy, vocabulary: list[str]) -> None:
    """Token ids must mean the same on every worker: the weights are shared."""
    vocab_hash = int(hashlib.sha256("\n".join(vocabulary).encode()).hexdigest()[:15], 16)
    if len(set(gather_from_workers(strategy, vocab_hash))) > 1:
        raise data_mod.DataError("the workers built different vocabularies: give every worker "
                                 "the same data and config")


def training_finished(run: Run, strategy: tf.distribute.Strategy) -> bool:
    """Whether an earlier session finished training this run; with several workers the chief's
    run decides, so that all take the same steps."""
    finished = run.status == "trained"
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        finished = max(gather_from_workers(strategy, int(finished))) == 1
    return finished


def fit(cfg: Config, model: keras.Model, train_ds: tf.data.Dataset, val_ds: tf.data.Dataset,
        run: Run, strategy: tf.distribute.Strategy) -> keras.callbacks.History:
    """`model.fit`, resumed from the run's backup with that epoch's shuffles and seed states."""
    done = restored_epoch(run.dir / BACKUP_DIR) if run.resumed else 0
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        # Workers resume from the oldest epoch any has (WorkerBackupAndRestore rolls back the rest).
        done = min(gather_from_workers(strategy, done))
    if run.resumed:
        tidy_history(run.dir / HISTORY_FILE, done)
        log.info("resuming from epoch %d of %d (%d completed epoch(s) restored from %s)",
                 done + 1, cfg.train.epochs, done, run.dir / BACKUP_DIR)
        skip_epochs(train_ds, done)
    run.update(started_at_epoch=done + 1)
    verbose = cfg.train.verbose if cfg.train.verbose is not None else (1 if sys.stdout.isatty() else 2)
    history = model.fit(train_ds, validation_data=val_ds, epochs=cfg.train.epochs,
                        callbacks=make_callbacks(cfg, run.dir), verbose=verbose)
    tidy_history(run.dir / HISTORY_FILE, cfg.train.epochs)
    return history


def skip_epochs(train_ds: tf.data.Dataset, epochs: int) -> None:
    """Draw the shuffles of `epochs` finished epochs, so a resumed run sees each epoch's order.

    A seeded `shuffle(reshuffle_each_iteration=True)` draws the next order on each pass;
    a run resumed at epoch N must not reuse the orders of epochs 1..N. Passes are cheap:
    no model, and the tokenized reviews are cached on the first.
    """
    for _ in range(epochs):
        for _ in train_ds:
            pass


def make_callbacks(cfg: Config, run_dir: Path) -> list[keras.callbacks.Callback]:
    monitor = cfg.train.monitor
    mode = "min" if monitor.endswith("loss") else "max"
    (run_dir / BEST_FILE).parent.mkdir(parents=True, exist_ok=True)
    return [
        keras.callbacks.ModelCheckpoint(str(run_dir / BEST_FILE), monitor=monitor, mode=mode,
                                        save_best_only=True, save_weights_only=True,
                                        initial_value_threshold=best_so_far(
                                            run_dir / HISTORY_FILE, monitor)),
        ResumableEarlyStopping(run_dir / HISTORY_FILE, monitor=monitor, mode=mode,
                               patience=cfg.train.early_stopping_patience),
        keras.callbacks.CSVLogger(str(run_dir / HISTORY_FILE), append=True),
        keras.callbacks.TensorBoard(str(run_dir / "tensorboard"), profile_batch=0),
        PretrainedSchedule(cfg.train.freeze_pretrained_epochs, cfg.model.pretrained_lr_scale),
        SeedStateBackup(run_dir / BACKUP_DIR / SEED_STATE_FILE),
        # Resume point after a kill: weights, optimizer and epoch, saved each epoch. Last, so
        # an epoch counts as done only once its history row and best checkpoint are on disk;
        # two copies, so a kill while writing one still leaves the previous epoch to resume.
        # Each worker backs up to its own dir; on a restart they agree on the epoch to resume.
        # Kept after fit: `keep_best_weights` deletes it once the run is marked trained.
        WorkerBackupAndRestore(str(run_dir / BACKUP_DIR), save_freq="epoch",
                               double_checkpoint=True, delete_checkpoint=False),
    ]


def keep_best_weights(model: keras.Model, run: Run) -> None:
    """Load the best validation epoch, save it as the run's weights and mark the run trained.

    From here on an interruption resumes at the evaluation; the backup is no longer needed.
    Safe to repeat: a resumed trained run goes through it again.
    """
    if (run.dir / BEST_FILE).is_file():
        model.load_weights(str(run.dir / BEST_FILE))
    elif run.status == "trained":  # no epoch improved on the start: the saved final weights
        model.load_weights(str(run.dir / WEIGHTS_FILE))
    model.save_weights(str(run.dir / WEIGHTS_FILE))
    plot_curves(run.dir / HISTORY_FILE, run.dir / CURVES_FILE)
    if run.status != "trained":
        run.update(status="trained")
    shutil.rmtree(run.dir / BACKUP_DIR, ignore_errors=True)


def ngram_branch(cfg: Config, raw: data_mod.RawSplits, vectorizer: keras.layers.TextVectorization,
                 model: keras.Model, run: Run) -> ngrams.NgramModel:
    """The run's n-gram branch: fitted once (`fit_ngram_branch`), saved in the run, reloaded
    on a rerun."""
    path = run.dir / NGRAMS_FILE
    if path.is_file():
        return ngrams.load(path)
    branch = fit_ngram_branch(cfg, vectorizer, model, data_mod.decoded(raw.train),
                              data_mod.decoded(raw.validation))
    ngrams.save(branch, path)
    return branch


def fit_ngram_branch(cfg: Config, vectorizer: keras.layers.TextVectorization, model: keras.Model,
                     train: tuple[list[str], np.ndarray], validation: tuple[list[str], np.ndarray]
                     ) -> ngrams.NgramModel:
    """The n-gram regression on the training reviews, and its blend with the trained LSTM
    on the validation reviews (which neither model was fitted on)."""
    t0 = time.time()
    log.info("n-gram branch: fitting on %d training reviews", len(train[0]))
    branch = ngrams.fit(*train, cfg.ngrams)
    texts, labels = validation
    z_lstm, z_ngram = score_texts(vectorizer, model, texts, cfg.vectorize.max_length, branch)
    branch = dataclasses.replace(branch, blend=ngrams.fit_blend(z_lstm, z_ngram, labels))
    a, b, c = branch.blend
    log.info("n-gram branch: %d n-grams in %.0fs; validation accuracy LSTM %.4f, n-grams %.4f; "
             "blend %.3f x LSTM + %.3f x n-grams %+.3f", len(branch.vocabulary), time.time() - t0,
             np.mean((z_lstm > 0) == labels), np.mean((z_ngram > 0) == labels), a, b, c)
    return branch


def evaluate(vectorizer: keras.layers.TextVectorization, model: keras.Model,
             raw_test: tf.data.Dataset, max_length: int, ngram: ngrams.NgramModel | None) -> dict:
    """Metrics of the served model on `raw_test`; with an n-gram branch, of each part as well."""
    texts, labels = data_mod.decoded(raw_test)
    z_lstm, z_ngram = score_texts(vectorizer, model, texts, max_length, ngram)
    metrics = metrics_of(served_probabilities(z_lstm, z_ngram, ngram), labels)
    if ngram is None:
        return metrics
    for part, z in (("lstm", z_lstm), ("ngrams", z_ngram)):
        alone = metrics_of(sigmoid(z), labels)
        metrics[part] = {k: alone[k] for k in ("accuracy", "auc", "loss")}
    metrics["blend"] = dict(zip(("lstm", "ngrams", "intercept"), ngram.blend, strict=True))
    return metrics


def metrics_of(p: np.ndarray, y: np.ndarray) -> dict:
    """Accuracy, precision, recall, AUC, loss and confusion matrix of probabilities `p`."""
    pred = (p >= THRESHOLD).astype(np.int64)
    tp, fp = int(np.sum((pred == 1) & (y == 1))), int(np.sum((pred == 1) & (y == 0)))
    tn, fn = int(np.sum((pred == 0) & (y == 0))), int(np.sum((pred == 0) & (y == 1)))
    eps = 1e-7
    pc = np.clip(p, eps, 1 - eps)
    auc = keras.metrics.AUC(num_thresholds=1000)
    auc.update_state(y, p)
    return {
        "examples": int(y.size),
        "accuracy": (tp + tn) / y.size,
        "precision": tp / (tp + fp) if tp + fp else 0.0,
        "recall": tp / (tp + fn) if tp + fn else 0.0,
        "auc": float(auc.result()),
        "loss": float(-np.mean(y * np.log(pc) + (1 - y) * np.log(1 - pc))),
        "confusion_matrix": {"labels": ["neg", "pos"], "rows_true_cols_pred": [[tn, fp], [fn, tp]]},
    }


def plot_curves(history_csv: Path, out_png: Path) -> None:
    """Loss and accuracy per epoch, train against validation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with history_csv.open() as f:
        rows = list(csv.DictReader(f))
    epochs = [int(r["epoch"]) + 1 for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("loss", "accuracy"), strict=True):
        ax.plot(epochs, [float(r[metric]) for r in rows], "o-", label="train")
        ax.plot(epochs, [float(r[f"val_{metric}"]) for r in rows], "o-", label="validation")
        ax.set_xlabel("epoch")
        ax.set_title(metric)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)


def load_run(run_dir: Path) -> tuple[Config, keras.layers.TextVectorization, keras.Model,
                                      ngrams.NgramModel | None]:
    """Rebuild a finished run's config, vectorizer, trained model and n-gram branch (if any)."""
    cfg = load_config(run_dir / CONFIG_FILE)
    vectorizer = make_vectorizer(cfg.vectorize, load_vocabulary(run_dir / VOCAB_FILE))
    model = build_model(vectorizer.vocabulary_size(), **model_kwargs(cfg.model))
    model.load_weights(str(run_dir / WEIGHTS_FILE))
    ngram = ngrams.load(run_dir / NGRAMS_FILE) if cfg.ngrams.enabled else None
    return cfg, vectorizer, model, ngram


def export_run(run_dir: Path, export_dir: str | None = None) -> ExportResult:
    """Export a finished run again (a new version) without retraining."""
    cfg, vectorizer, model, ngram = load_run(run_dir)
    if export_dir is not None:
        cfg = cfg.model_copy(update={"export": cfg.export.model_copy(update={"dir": export_dir})})
    raw = data_mod.load_raw(cfg.data, cfg.seed)
    result = export_model(vectorizer, model, cfg, check_texts(raw.test), ngram, raw.labels)
    save_result(result, run_dir / EXPORT_FILE)
    return result
