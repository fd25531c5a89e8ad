"""Training: ingest -> vectorize -> fit under a tf.distribute strategy -> evaluate -> export.

Each run has its own directory `runs/<name>/<time>-<fingerprint>/` holding the
resolved config, vocabulary, checkpoints, history, TensorBoard logs, metrics and
export record. An unfinished run with the same config fingerprint is resumed
from its last completed epoch unless `fresh=True`.
"""

from __future__ import annotations

import csv
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from pipeline import data as data_mod
from pipeline.config import Config, load_config, save_config
from pipeline.distribute import is_chief, make_strategy
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


@dataclass(frozen=True)
class RunResult:
    run_dir: Path
    metrics: dict
    export: ExportResult | None


def seed_everything(cfg: Config) -> None:
    keras.utils.set_random_seed(cfg.seed)
    if cfg.train.deterministic:
        tf.config.experimental.enable_op_determinism()


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def open_run_dir(cfg: Config, fresh: bool) -> tuple[Path, bool]:
    """Return (run dir, resumed): the newest unfinished run of this config, or a new one."""
    root = Path(cfg.runs_dir) / cfg.name
    fingerprint = cfg.fingerprint()
    if not fresh and root.is_dir():
        for run_dir in sorted(root.glob(f"*-{fingerprint}"), reverse=True):
            if _read_json(run_dir / RUN_FILE).get("status") == "running":
                return run_dir, True
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = root / f"{stamp}-{fingerprint}"
    suffix = 1
    while run_dir.exists():  # two runs started in the same second
        run_dir = root / f"{stamp}.{suffix}-{fingerprint}"
        suffix += 1
    run_dir.mkdir(parents=True)
    return run_dir, False


def latest_finished_run(cfg: Config) -> Path:
    """The newest run directory of this model name whose training finished."""
    root = Path(cfg.runs_dir) / cfg.name
    for run_dir in sorted(root.glob("*-*"), reverse=True):
        if _read_json(run_dir / RUN_FILE).get("status") in ("finished", "trained"):
            return run_dir
    raise FileNotFoundError(f"no finished run under {root}: run `make train` first")


def _best_so_far(history: Path, monitor: str) -> float | None:
    """Best monitored value in a resumed run's history, so a checkpoint is never downgraded."""
    if not history.is_file():
        return None
    with history.open() as f:
        values = [float(row[monitor]) for row in csv.DictReader(f) if row.get(monitor)]
    if not values:
        return None
    return min(values) if monitor.endswith("loss") else max(values)


def make_callbacks(cfg: Config, run_dir: Path) -> list[keras.callbacks.Callback]:
    monitor = cfg.train.monitor
    mode = "min" if monitor.endswith("loss") else "max"
    (run_dir / BEST_FILE).parent.mkdir(parents=True, exist_ok=True)
    return [
        # Resume point after a kill: weights, optimizer and epoch, saved each epoch.
        keras.callbacks.BackupAndRestore(str(run_dir / "backup"), save_freq="epoch",
                                         delete_checkpoint=True),
        keras.callbacks.ModelCheckpoint(str(run_dir / BEST_FILE), monitor=monitor, mode=mode,
                                        save_best_only=True, save_weights_only=True,
                                        initial_value_threshold=_best_so_far(
                                            run_dir / HISTORY_FILE, monitor)),
        keras.callbacks.EarlyStopping(monitor=monitor, mode=mode,
                                      patience=cfg.train.early_stopping_patience),
        keras.callbacks.CSVLogger(str(run_dir / HISTORY_FILE), append=True),
        keras.callbacks.TensorBoard(str(run_dir / "tensorboard"), profile_batch=0),
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
    seed_everything(cfg)
    strategy = make_strategy(cfg.distribute)
    chief = is_chief()
    run_dir, resumed = open_run_dir(cfg, fresh)
    log.info("%s run in %s", "resuming" if resumed else "new", run_dir)
    save_config(cfg, run_dir / CONFIG_FILE)
    info = _read_json(run_dir / RUN_FILE) | {
        "status": "running", "fingerprint": cfg.fingerprint(),
        "hyperparameters_from": provenance or {"source": "config"},
        "strategy": type(strategy).__name__, "replicas": strategy.num_replicas_in_sync,
    }
    _write_json(run_dir / RUN_FILE, info)

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

    global_batch = cfg.train.batch_size * strategy.num_replicas_in_sync
    replicas = strategy.num_replicas_in_sync
    train_ds = vectorize_split(raw.train, vectorizer, cfg.vectorize, cfg.train, global_batch,
                               shuffle_seed=cfg.seed, replicas=replicas)
    val_ds = vectorize_split(raw.validation, vectorizer, cfg.vectorize, cfg.train, global_batch,
                             replicas=replicas)
    # Test is scored on one device by `evaluate`, so every review counts.
    test_ds = vectorize_split(raw.test, vectorizer, cfg.vectorize, cfg.train, global_batch)

    lr = cfg.model.learning_rate
    if cfg.train.lr_scaling == "linear":
        lr *= strategy.num_replicas_in_sync
    matrix = embedding_matrix_for(cfg, vocabulary)
    with strategy.scope():  # only construction and compile belong in the scope
        model = build_model(len(vocabulary), **(model_kwargs(cfg.model) | {"learning_rate": lr}),
                            embedding_matrix=matrix)
    info |= {"global_batch": global_batch, "learning_rate": lr, "data_sizes": sizes,
             "trainable_params": int(sum(np.prod(w.shape) for w in model.trainable_weights))}
    _write_json(run_dir / RUN_FILE, info)

    verbose = cfg.train.verbose if cfg.train.verbose is not None else (1 if sys.stdout.isatty() else 2)
    t_fit = time.time()
    model.fit(train_ds, validation_data=val_ds, epochs=cfg.train.epochs,
              callbacks=make_callbacks(cfg, run_dir), verbose=verbose)
    fit_seconds = time.time() - t_fit

    if (run_dir / BEST_FILE).is_file():
        model.load_weights(str(run_dir / BEST_FILE))  # best validation epoch, resume-proof
    model.save_weights(str(run_dir / WEIGHTS_FILE))
    plot_curves(run_dir / HISTORY_FILE, run_dir / CURVES_FILE)

    log.info("evaluating on %d test reviews", sizes["test"])
    metrics = evaluate(model, test_ds)
    _write_json(run_dir / METRICS_FILE, metrics)
    info |= {"status": "trained", "fit_seconds_this_session": round(fit_seconds, 1)}
    _write_json(run_dir / RUN_FILE, info)

    result = None
    if export and chief:
        result = export_model(vectorizer, model, cfg, check_texts(raw.test))
        save_result(result, run_dir / EXPORT_FILE)
    info |= {"status": "finished", "total_seconds_this_session": round(time.time() - t0, 1)}
    _write_json(run_dir / RUN_FILE, info)
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
