"""Training: ingest -> vectorize -> fit under a tf.distribute strategy -> evaluate -> export.

Each run has its own directory `runs/<name>/<time>-<fingerprint>/` holding the
resolved config, vocabulary, checkpoints, history, TensorBoard logs, metrics and
export record. An unfinished run with the same config fingerprint is resumed
from its last completed epoch unless `fresh=True`.
"""

from __future__ import annotations

import csv
import hashlib
import json
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
from pipeline.config import Config, load_config, save_config
from pipeline.distribute import (
    WorkerBackupAndRestore,
    fix_keras_multi_worker,
    gather_from_workers,
    is_chief,
    make_strategy,
    num_workers,
    resolve_deterministic,
    shard_by_data,
    strategy_name,
    task_name,
)
from pipeline.export import ExportResult, export_model, save_result
from pipeline.model import build_model, model_kwargs
from pipeline.vectorize import (
    adapt_vectorizer,
    load_vocabulary,
    make_vectorizer,
    save_vocabulary,
    vectorize_split,
)

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
RUN_FILE = "run.json"
VOCAB_FILE = "vocabulary.txt"
WEIGHTS_FILE = "model.weights.h5"
BEST_FILE = "checkpoints/best.weights.h5"
HISTORY_FILE = "history.csv"
METRICS_FILE = "metrics.json"
CURVES_FILE = "curves.png"
EXPORT_FILE = "export.json"
BACKUP_DIR = "backup"
SEED_STATE_FILE = "seed_state.json"  # beside the Keras backup, deleted with it


@dataclass(frozen=True)
class RunResult:
    run_dir: Path
    metrics: dict
    export: ExportResult | None
    chief: bool = True  # False: a multi-worker helper; the chief holds the run, run_dir is gone


def seed_everything(cfg: Config) -> None:
    keras.utils.set_random_seed(cfg.seed)
    if resolve_deterministic(cfg.train.deterministic):
        tf.config.experimental.enable_op_determinism()


def read_json(path: Path) -> dict:
    """A JSON file's object, or {} when it does not exist yet."""
    return json.loads(path.read_text()) if path.is_file() else {}


def write_json(path: Path, obj: dict) -> None:
    """Write via a temp file and rename, so a kill never leaves half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def open_run_dir(cfg: Config, fresh: bool) -> tuple[Path, bool]:
    """Return (run dir, resumed): the newest unfinished run of this config, or a new one."""
    root = Path(cfg.runs_dir) / cfg.name
    fingerprint = cfg.fingerprint()
    if not fresh and root.is_dir():
        for run_dir in sorted(root.glob(f"[!.]*-{fingerprint}"), reverse=True):  # not worker temps
            if read_json(run_dir / RUN_FILE).get("status") == "running":
                return run_dir, True
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = root / f"{stamp}-{fingerprint}"
    suffix = 1
    while run_dir.exists():  # two runs started in the same second
        run_dir = root / f"{stamp}.{suffix}-{fingerprint}"
        suffix += 1
    run_dir.mkdir(parents=True)
    return run_dir, False


def open_worker_dir(cfg: Config, fresh: bool) -> tuple[Path, bool]:
    """Return (scratch dir, resumed) for a multi-worker non-chief: `.workertemp-<task>-<fingerprint>`.

    It holds what the worker's callbacks write, its backup included, so its name is
    the same on a restart; it is deleted when the worker finishes.
    """
    work_dir = Path(cfg.runs_dir) / cfg.name / f".workertemp-{task_name()}-{cfg.fingerprint()}"
    if fresh:
        shutil.rmtree(work_dir, ignore_errors=True)
    resumed = work_dir.is_dir()
    work_dir.mkdir(parents=True, exist_ok=True)
    return work_dir, resumed


def latest_finished_run(cfg: Config) -> Path:
    """The newest run directory of this model name whose training finished."""
    root = Path(cfg.runs_dir) / cfg.name
    for run_dir in sorted(root.glob("[!.]*-*"), reverse=True):
        if read_json(run_dir / RUN_FILE).get("status") in ("finished", "trained"):
            return run_dir
    raise FileNotFoundError(f"no finished run under {root}: run `make train` first")


def _history_rows(history: Path) -> list[dict]:
    if not history.is_file():
        return []
    with history.open(newline="") as f:
        return list(csv.DictReader(f))


def _monitored(history: Path, monitor: str) -> list[float]:
    return [float(row[monitor]) for row in _history_rows(history) if row.get(monitor)]


def _best_so_far(history: Path, monitor: str) -> float | None:
    """Best monitored value in a resumed run's history, so a checkpoint is never downgraded."""
    values = _monitored(history, monitor)
    if not values:
        return None
    return min(values) if monitor.endswith("loss") else max(values)


def restored_epoch(run_dir: Path) -> int:
    """Epochs completed according to the BackupAndRestore state (what `fit` resumes after)."""
    meta = read_json(run_dir / BACKUP_DIR / "training_metadata.json")
    return int(meta.get("epoch", 0))


def tidy_history(history: Path, epochs_done: int) -> None:
    """Keep one row per completed epoch, dropping the rows of epochs that will be run again.

    A kill can land after CSVLogger wrote a row (or half a row) but before the
    backup recorded that epoch; the rerun epoch would otherwise appear twice.
    """
    if not history.is_file():
        return
    with history.open(newline="") as f:
        reader = csv.DictReader(f)
        fields, rows = reader.fieldnames, list(reader)
    if not fields:
        return
    kept: dict[int, dict] = {}
    for row in rows:
        epoch = row.get("epoch") or ""
        if epoch.isdigit() and int(epoch) < epochs_done and None not in row.values():
            kept[int(epoch)] = row  # the last complete row of an epoch wins
    tmp = history.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(kept[e] for e in sorted(kept))
    tmp.replace(history)


class ResumableEarlyStopping(keras.callbacks.EarlyStopping):
    """EarlyStopping that carries its best value and patience count over a resume."""

    def __init__(self, history: Path, **kwargs):
        super().__init__(**kwargs)
        self._history = history

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        # Replay the finished epochs, so a resumed run stops where an uninterrupted one would.
        for epoch, value in enumerate(_monitored(self._history, self.monitor)):
            self.wait += 1
            if self.best is None or (value < self.best if self.mode == "min" else value > self.best):
                self.best, self.best_epoch, self.wait = value, epoch, 0


class SeedStateBackup(keras.callbacks.Callback):
    """Backs up the dropout seed states each epoch and restores them on a resume.

    BackupAndRestore's weights file leaves SeedGenerator states out, so a resumed run
    would draw other dropout masks than an uninterrupted one. The states are kept per
    completed epoch (the last two), so they match whichever epoch the backup resumes from.
    """

    def __init__(self, path: Path):
        super().__init__()
        self._path = path
        self._restored = False

    def _states(self) -> list:
        weights = {id(v) for v in self.model.weights}
        return [v for v in self.model.variables if id(v) not in weights]  # the seed states

    def on_train_begin(self, logs=None):
        self._restored = False

    def on_epoch_begin(self, epoch, logs=None):
        # The first epoch of a session is the one the backup resumed at, whatever decided it.
        if self._restored:
            return
        self._restored = True
        saved, states = read_json(self._path).get(str(epoch)), self._states()
        if saved and len(saved) == len(states):
            for var, value in zip(states, saved, strict=True):
                var.assign(np.asarray(value, dtype=var.dtype))

    def on_epoch_end(self, epoch, logs=None):
        saved = {k: v for k, v in read_json(self._path).items() if int(k) >= epoch}
        saved[str(epoch + 1)] = [np.asarray(var).tolist() for var in self._states()]
        self._path.parent.mkdir(parents=True, exist_ok=True)
        write_json(self._path, saved)


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
                                        initial_value_threshold=_best_so_far(
                                            run_dir / HISTORY_FILE, monitor)),
        ResumableEarlyStopping(run_dir / HISTORY_FILE, monitor=monitor, mode=mode,
                               patience=cfg.train.early_stopping_patience),
        keras.callbacks.CSVLogger(str(run_dir / HISTORY_FILE), append=True),
        keras.callbacks.TensorBoard(str(run_dir / "tensorboard"), profile_batch=0),
        SeedStateBackup(run_dir / BACKUP_DIR / SEED_STATE_FILE),
        # Resume point after a kill: weights, optimizer and epoch, saved each epoch. Last, so
        # an epoch counts as done only once its history row and best checkpoint are on disk;
        # two copies, so a kill while writing one still leaves the previous epoch to resume.
        # Each worker backs up to its own dir; on a restart they agree on the epoch to resume.
        WorkerBackupAndRestore(str(run_dir / BACKUP_DIR), save_freq="epoch",
                               double_checkpoint=True, delete_checkpoint=True),
    ]


def evaluate(model: keras.Model, test_ds: tf.data.Dataset) -> dict:
    """Accuracy, precision, recall, AUC, loss and confusion matrix on one pass over the data."""
    predict = tf.function(lambda ids: model(ids, training=False),
                          input_signature=[tf.TensorSpec([None, None], tf.int64)])
    probs, labels = [], []
    for ids, y in test_ds:
        probs.append(np.asarray(predict(ids), dtype=np.float64).reshape(-1))
        labels.append(y.numpy().reshape(-1))
    p, y = np.concatenate(probs), np.concatenate(labels).astype(np.int64)
    pred = (p >= 0.5).astype(np.int64)
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


def check_texts(raw_test: tf.data.Dataset, n: int = 32) -> list[str]:
    """Real test reviews plus edge cases: what the export check compares on."""
    reviews = [t.decode("utf-8", "replace") for t, _ in raw_test.take(n).as_numpy_iterator()]
    return reviews + ["", "   ", "!!!", "A wonderful, moving film.", "Dull and far too long."]


def embedding_matrix_for(cfg: Config, vocabulary: list[str]) -> np.ndarray | None:
    if cfg.model.embedding_init == "random":
        return None
    from pipeline.pretrain import embedding_matrix

    return embedding_matrix(cfg, vocabulary)


def train(cfg: Config, fresh: bool = False, export: bool = True,
          provenance: dict | None = None) -> RunResult:
    """Run the whole pipeline for one config; returns the run dir, test metrics and export."""
    t0 = time.time()
    strategy = make_strategy(cfg.distribute)  # first: multi-worker must set up before any TF op
    if cfg.model.tuned_hparams:  # `make tune`'s best values replace the config's; run.json says so
        from pipeline.tune import apply_tuned

        cfg, tuned = apply_tuned(cfg)
        provenance = (provenance or {}) | tuned
    seed_everything(cfg)
    multi_worker = isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
    chief = not multi_worker or is_chief()
    # Only the chief writes the run; other workers write to a scratch dir deleted at the end.
    run_dir, resumed = open_run_dir(cfg, fresh) if chief else open_worker_dir(cfg, fresh)
    log.info("%s %s in %s", "resuming" if resumed else "new",
             "run" if chief else f"{task_name()} scratch dir", run_dir)
    save_config(cfg, run_dir / CONFIG_FILE)
    info = read_json(run_dir / RUN_FILE) | {
        "status": "running", "fingerprint": cfg.fingerprint(),
        "hyperparameters_from": provenance or {"source": "config"},
        "strategy": strategy_name(strategy), "replicas": strategy.num_replicas_in_sync,
        "workers": num_workers() if multi_worker else 1,
    }
    write_json(run_dir / RUN_FILE, info)

    raw = data_mod.load_raw(cfg.data, cfg.seed)
    sizes = data_mod.check_nonempty(raw)
    log.info("data: %s", ", ".join(f"{k} {v}" for k, v in sizes.items()))

    vocab_path = run_dir / VOCAB_FILE
    if resumed and vocab_path.is_file():
        vectorizer = make_vectorizer(cfg.vectorize, load_vocabulary(vocab_path))
    else:
        log.info("adapting the vocabulary on %d training reviews", sizes["train"])
        vectorizer = adapt_vectorizer(cfg.vectorize, raw.train)
        save_vocabulary(vectorizer, vocab_path)
    vocabulary = vectorizer.get_vocabulary()
    log.info("vocabulary: %d tokens", len(vocabulary))
    if multi_worker:  # token ids must mean the same on every worker: the weights are shared
        vocab_hash = int(hashlib.sha256("\n".join(vocabulary).encode()).hexdigest()[:15], 16)
        if len(set(gather_from_workers(strategy, vocab_hash))) > 1:
            raise data_mod.DataError("the workers built different vocabularies: give every worker "
                                     "the same data and config")

    global_batch = cfg.train.batch_size * strategy.num_replicas_in_sync
    replicas = strategy.num_replicas_in_sync
    train_ds = vectorize_split(raw.train, vectorizer, cfg.vectorize, cfg.train, global_batch,
                               shuffle_seed=cfg.seed, replicas=replicas)
    val_ds = vectorize_split(raw.validation, vectorizer, cfg.vectorize, cfg.train, global_batch,
                             replicas=replicas)
    train_ds, val_ds = shard_by_data(train_ds), shard_by_data(val_ds)
    # Test is scored on one device by `evaluate` (the chief's), so every review counts.
    test_ds = vectorize_split(raw.test, vectorizer, cfg.vectorize, cfg.train, global_batch)

    lr = cfg.model.learning_rate
    if cfg.train.lr_scaling == "linear":
        lr *= strategy.num_replicas_in_sync
    matrix = embedding_matrix_for(cfg, vocabulary)
    with strategy.scope():  # only construction and compile belong in the scope
        model = build_model(len(vocabulary), **(model_kwargs(cfg.model) | {"learning_rate": lr}),
                            embedding_matrix=matrix)
    fix_keras_multi_worker(model, strategy)  # a no-op unless multi-worker
    info |= {"global_batch": global_batch, "learning_rate": lr, "data_sizes": sizes,
             "trainable_params": int(sum(np.prod(w.shape) for w in model.trainable_weights))}
    write_json(run_dir / RUN_FILE, info)

    verbose = cfg.train.verbose if cfg.train.verbose is not None else (1 if sys.stdout.isatty() else 2)
    t_fit = time.time()
    fit_complete = bool(info.get("fit_complete"))
    if multi_worker:  # all take the same steps: if the chief's training finished, nobody trains
        fit_complete = max(gather_from_workers(strategy, int(fit_complete))) == 1
    if fit_complete:
        log.info("training already finished in an earlier session; evaluating its best epoch")
    else:
        done = restored_epoch(run_dir) if resumed else 0
        if resumed:
            tidy_history(run_dir / HISTORY_FILE, done)
            log.info("resuming from epoch %d of %d (%d completed epoch(s) restored from %s)",
                     done + 1, cfg.train.epochs, done, run_dir / BACKUP_DIR)
            skip_epochs(train_ds, done)
        info |= {"started_at_epoch": done + 1}
        write_json(run_dir / RUN_FILE, info)
        history = model.fit(train_ds, validation_data=val_ds, epochs=cfg.train.epochs,
                            callbacks=make_callbacks(cfg, run_dir), verbose=verbose)
        tidy_history(run_dir / HISTORY_FILE, cfg.train.epochs)
        # fit_complete: a kill from here on resumes at the evaluation, not at training.
        info |= {"fit_complete": True, "epochs_run_this_session": len(history.epoch)}
        write_json(run_dir / RUN_FILE, info)
    fit_seconds = time.time() - t_fit

    if not chief:
        # The chief has the same weights; its evaluation and export take no collective
        # steps, so this worker is no longer needed.
        shutil.rmtree(run_dir, ignore_errors=True)
        log.info("%s finished training; the chief writes the run", task_name())
        return RunResult(run_dir, {}, None, chief=False)

    if (run_dir / BEST_FILE).is_file():
        model.load_weights(str(run_dir / BEST_FILE))  # best validation epoch, resume-proof
    model.save_weights(str(run_dir / WEIGHTS_FILE))
    plot_curves(run_dir / HISTORY_FILE, run_dir / CURVES_FILE)

    log.info("evaluating on %d test reviews", sizes["test"])
    metrics = evaluate(model, test_ds)
    write_json(run_dir / METRICS_FILE, metrics)
    info |= {"status": "trained", "fit_seconds_this_session": round(fit_seconds, 1)}
    write_json(run_dir / RUN_FILE, info)

    result = None
    if export and chief:
        result = export_model(vectorizer, model, cfg, check_texts(raw.test))
        save_result(result, run_dir / EXPORT_FILE)
    info |= {"status": "finished", "total_seconds_this_session": round(time.time() - t0, 1),
             "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    write_json(run_dir / RUN_FILE, info)
    return RunResult(run_dir, metrics, result)


def load_run(run_dir: Path) -> tuple[Config, keras.layers.TextVectorization, keras.Model]:
    """Rebuild a finished run's config, vectorizer and trained model from its directory."""
    cfg = load_config(run_dir / CONFIG_FILE)
    vectorizer = make_vectorizer(cfg.vectorize, load_vocabulary(run_dir / VOCAB_FILE))
    model = build_model(vectorizer.vocabulary_size(), **model_kwargs(cfg.model))
    model.load_weights(str(run_dir / WEIGHTS_FILE))
    return cfg, vectorizer, model


def export_run(run_dir: Path, export_dir: str | None = None) -> ExportResult:
    """Export a finished run again (a new version) without retraining."""
    cfg, vectorizer, model = load_run(run_dir)
    if export_dir is not None:
        cfg = cfg.model_copy(update={"export": cfg.export.model_copy(update={"dir": export_dir})})
    raw = data_mod.load_raw(cfg.data, cfg.seed)
    result = export_model(vectorizer, model, cfg, check_texts(raw.test))
    save_result(result, run_dir / EXPORT_FILE)
    return result
