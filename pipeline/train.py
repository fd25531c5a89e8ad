"""The training spine: data -> vectorize (+ distillation's soft targets) -> model -> fit ->
n-gram branch -> evaluate -> export, for one model.

`train(cfg)` reads top to bottom in that order, each step a call into its module: scoring,
the blend and the metrics live in `pipeline.scoring`, the export in `pipeline.export`, the
bookkeeping (the run directory and its lock, the run record, the resume state) in
`pipeline.runs`. Each run has its own directory `runs/<name>/<time>-<fingerprint>/`
holding the resolved config, vocabulary, checkpoints, history, TensorBoard logs, metrics
and export record.

A rerun of the same config resumes its newest unfinished run (unless `fresh=True`):
from the last completed epoch while it was training, at the evaluation and export once
training had finished; which of the two is decided once, when the run opens. Tuned
hyperparameters arrive already applied to `cfg` (`pipeline.tuned.apply_tuned`, called by the
CLI); `provenance` records where they came from. Distillation's `served` teacher is a run
of its own, trained before this one by `pipeline.rounds`, which hands its folder in.
"""

from __future__ import annotations

import hashlib
import logging
import resource
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from pipeline import data as data_mod
from pipeline import distill, ngrams
from pipeline.atomic import atomic_path
from pipeline.compat import fix_keras_multi_worker
from pipeline.config import Config, TrainConfig, save_config
from pipeline.distribute import (
    WorkerBackupAndRestore,
    describe,
    gather_from_workers,
    is_chief,
    make_strategy,
    num_workers,
    seed_everything,
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
)
from pipeline.fingerprint import run_fingerprint
from pipeline.gate import GateRefused, GateRows
from pipeline.model import (
    build_model,
    float32_model,
    fit_verbosity,
    load_weights,
    model_kwargs,
    trainable_params,
)
from pipeline.pretrain import initial_weights
from pipeline.report import plot_curves
from pipeline.resume import ResumableEarlyStopping, SeedStateBackup, best_so_far, restored_epoch, tidy_history
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
    Run,
    open_run,
    open_worker_run,
    write_json,
)
from pipeline.scoring import evaluate_rows
from pipeline.stacking import fit_ngram_branch
from pipeline.vectorize import (
    adapt_vectorizer,
    batch_ids,
    load_vocabulary,
    make_vectorizer,
    save_vocabulary,
    steps_per_epoch,
    vectorize_cached,
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
          provenance: dict | None = None, force: bool = False,
          teacher_dir: Path | None = None, test: bool = True) -> RunResult:
    """Train, evaluate and export one model for `cfg`; returns the run dir, test metrics and export.

    `provenance`: where tuned hyperparameters came from (`tuned.apply_tuned`'s second value);
    required when `cfg.model.tuned_hparams` is set, recorded in run.json. `force`: publish even
    what the release gate refuses. A refused export still finishes the run (its metrics and
    export.json kept) and then raises `GateRefused`. `teacher_dir`: the finished teacher run
    whose served model labels the unlabelled reviews (`distill.teacher: served`), its scores
    cached in it (`pipeline.rounds.teacher_round`). `test=False` (a tuning execution) never
    reads the test split: no test metrics and no export.
    """
    if cfg.model.tuned_hparams and provenance is None:
        raise ValueError("cfg.model.tuned_hparams is set: resolve it with pipeline.tuned.apply_tuned "
                         "first and pass its provenance")
    served = cfg.distill.enabled and cfg.distill.teacher == "served"
    if served != (teacher_dir is not None):
        raise ValueError("distill.teacher 'served' needs the teacher run's folder, and only it: "
                         "train through pipeline.rounds.train_rounds")
    t0 = time.time()
    strategy = make_strategy(cfg.distribute)  # first: multi-worker must set up before any TF op
    seed_everything(cfg)
    multi_worker = isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
    chief = not multi_worker or is_chief()
    export = export and test
    if export and chief:
        check_writable(cfg)  # an export folder that cannot be written fails now, not after training

    # Data: read through (a damaged file is named) before anything is written under runs/.
    raw = data_mod.load_raw(cfg.data, cfg.seed)
    sizes = data_mod.check_nonempty(raw, names=("train", "validation", "test")[:3 if test else 2])
    distill.check_unlabelled(cfg)
    log.info("data: %s; training on %s", ", ".join(f"{k} {v}" for k, v in sizes.items()),
             describe(strategy))
    fingerprint = run_fingerprint(cfg, data_mod.data_identity(cfg.data))

    # Only the chief writes the run; other workers write to a scratch dir deleted at the end.
    # Leaving the `with` releases the run's lock; a PipelineError while training marks it failed.
    run = open_run(cfg, fingerprint, fresh) if chief else open_worker_run(cfg, fingerprint,
                                                                          task_name(), fresh)
    with run:
        log.info("%s %s in %s", "resuming" if run.resumed else "new",
                 "run" if chief else f"{task_name()} scratch dir", run.dir)
        # The resume plan, decided once: a run that finished training in an earlier session
        # goes straight to its evaluation, so it needs no teacher, start or schedule.
        trained = training_finished(run, strategy)
        save_config(cfg, run.dir / CONFIG_FILE)
        run.update(hyperparameters_from=provenance or {"source": "config"}, data_sizes=sizes,
                   labels=list(raw.labels),  # [label 0, label 1 (positive)]: export and predict name them
                   strategy=strategy_name(strategy), replicas=strategy.num_replicas_in_sync,
                   precision=keras.mixed_precision.global_policy().name,
                   workers=num_workers() if multi_worker else 1)

        # Vectorize: the vocabulary is adapted once per run and reloaded on a resume.
        vectorizer = run_vectorizer(cfg, raw.train, sizes["train"], run)
        vocabulary = vectorizer.get_vocabulary()
        log.info("vocabulary: %d tokens", len(vocabulary))
        if multi_worker:
            check_same_vocabulary(strategy, vocabulary)
        replicas = strategy.num_replicas_in_sync
        global_batch = cfg.train.batch_size * replicas
        # Distillation: the teacher's soft targets for the unlabelled reviews join the training
        # split (a trained run needs no training split, so no teacher either).
        teacher = run_teacher(cfg, raw, run, teacher_dir) if cfg.distill.enabled and not trained else None
        train_raw, train_cfg = training_split(cfg, raw, sizes["train"], teacher)
        train_rows = vectorize_cached(train_raw, vectorizer, cfg.vectorize)
        train_ds = batch_ids(train_rows, cfg.vectorize, train_cfg, global_batch,
                             shuffle_seed=cfg.seed, replicas=replicas)
        val_ds = vectorize_split(raw.validation, vectorizer, cfg.vectorize, cfg.train, global_batch,
                                 replicas=replicas)
        train_ds, val_ds = shard_by_data(train_ds), shard_by_data(val_ds)

        # Model: only construction and compile belong in the strategy's scope.
        lr = cfg.model.learning_rate * (replicas if cfg.train.lr_scaling == "linear" else 1)
        # word2vec or a vectors file; a trained run's saved weights replace any start, so it
        # needs none (nor the pretraining a missing cache would start).
        pretrained = {} if trained else initial_weights(cfg, vocabulary)
        # A cosine schedule spans every step of train.epochs, the batches counted per bucket.
        decay_steps = (steps_per_epoch(train_rows, cfg.vectorize, train_cfg, global_batch)
                       * cfg.train.epochs
                       if cfg.train.lr_schedule == "cosine" and not trained else None)
        with strategy.scope():
            model = build_model(len(vocabulary),
                                **(model_kwargs(cfg.model, cfg.experimental) | {"learning_rate": lr}),
                                decay_steps=decay_steps, **pretrained)
        fix_keras_multi_worker(model, strategy)  # a no-op unless multi-worker
        run.update(global_batch=global_batch, learning_rate=lr, decay_steps=decay_steps,
                   trainable_params=trainable_params(model))

        # Fit, unless an earlier session of this run got through it.
        t_fit = time.time()
        if trained:
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
        if model.compute_dtype != "float32":  # 16-bit compute trained it; float32 serves it
            model = float32_model(model, cfg.model)
        write_projector(model.get_layer("embedding").get_weights()[0], vocabulary,
                        run.dir / "tensorboard" / "embedding")
        run.update(fit_seconds_this_session=round(time.time() - t_fit, 1))

        # The n-gram branch, evaluation and export: a rerun after an interruption from here on
        # starts here again (a fitted branch is reloaded). Test is scored by the chief alone,
        # on the reviews as they are served, so every review counts.
        ngram = (ngram_branch(cfg, raw, vectorizer, model, run, teacher, teacher_dir)
                 if cfg.ngrams.enabled else None)
        metrics, result, refused = {}, None, None
        if test:
            log.info("evaluating on %d test reviews", sizes["test"])
            test_texts, test_labels = data_mod.decoded(raw.test)
            metrics, served = evaluate_rows(vectorizer, model, test_texts, test_labels,
                                            cfg.vectorize.max_length, ngram, raw.labels)
            write_json(run.dir / METRICS_FILE, metrics)
        if export:
            try:
                result = export_model(vectorizer, model, cfg, check_texts(raw.test), ngram, raw.labels,
                                      GateRows(test_texts, test_labels, served, raw.labels), force)
                save_result(result, run.dir / EXPORT_FILE)
            except GateRefused as exc:  # the run is done all the same: make export --force publishes it
                save_result(exc.record, run.dir / EXPORT_FILE)
                refused = exc
        run.update(status="finished", total_seconds_this_session=round(time.time() - t0, 1),
                   peak_rss_mib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1))
        if refused is not None:
            raise refused
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


def run_teacher(cfg: Config, raw: data_mod.RawSplits, run: Run, teacher_dir: Path | None
                ) -> distill.Teacher:
    """The distillation teacher: the n-gram regression fitted on the training reviews, or the
    served model of the finished run `teacher_dir`; its scores from their cache when they match."""
    if teacher_dir is None:
        t = distill.ngram_teacher(cfg, data_mod.decoded(raw.train))
        where = str(distill.cache_stem(cfg))
    else:
        branch_file = teacher_dir / NGRAMS_FILE
        t = distill.served_teacher(teacher_dir, distill.unlabelled_reviews(cfg),
                                   ngrams.load(branch_file) if branch_file.is_file() else None)
        where = str(teacher_dir)
    run.update(distill={"teacher": cfg.distill.teacher, "unlabelled_reviews": len(t.texts),
                        "confident_share": round(distill.confident_share(t.probabilities), 4),
                        "mean_probability": round(float(np.mean(t.probabilities)), 4),
                        "from": where, "cached": t.cached})
    return t


def training_split(cfg: Config, raw: data_mod.RawSplits, n_train: int,
                   teacher: distill.Teacher | None) -> tuple[tf.data.Dataset, TrainConfig]:
    """The split the BiLSTM trains on, and the train settings for it: the training reviews, or
    with a teacher those plus the unlabelled ones, shuffled as one (so every batch mixes both)."""
    if teacher is None:
        return raw.train, cfg.train
    log.info("distill: training on %d labelled + %d teacher-labelled reviews",
             n_train, len(teacher.texts))
    rows = n_train + len(teacher.texts)
    return (distill.student_split(raw.train, teacher),
            cfg.train.model_copy(update={"shuffle_buffer": max(cfg.train.shuffle_buffer, rows)}))


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
    history = model.fit(train_ds, validation_data=val_ds, epochs=cfg.train.epochs,
                        callbacks=make_callbacks(cfg, run.dir), verbose=fit_verbosity(cfg.train.verbose))
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
        load_weights(model, run.dir / BEST_FILE)
    elif run.status == "trained":  # no epoch improved on the start: the saved final weights
        load_weights(model, run.dir / WEIGHTS_FILE)
    with atomic_path(run.dir / WEIGHTS_FILE, suffix=".weights.h5") as tmp:  # Keras needs the ending
        model.save_weights(str(tmp))
    plot_curves(run.dir / HISTORY_FILE, run.dir / CURVES_FILE)
    if run.status != "trained":
        run.update(status="trained")
    shutil.rmtree(run.dir / BACKUP_DIR, ignore_errors=True)


def ngram_branch(cfg: Config, raw: data_mod.RawSplits, vectorizer: keras.layers.TextVectorization,
                 model: keras.Model, run: Run, teacher: distill.Teacher | None = None,
                 teacher_dir: Path | None = None) -> ngrams.NgramModel:
    """The run's n-gram branch: fitted once (`fit_ngram_branch`), saved in the run, reloaded
    on a rerun. A distilling run's teacher is the same regression on the same reviews: reused,
    unless `ngrams.cotrain` refits it on the unlabelled reviews too, labelled by `model`."""
    path = run.dir / NGRAMS_FILE
    if path.is_file():
        return ngrams.load(path)
    unlabelled = None
    if cfg.ngrams.cotrain:  # the teacher, when there is one, holds them already
        unlabelled = teacher.texts if teacher is not None else distill.unlabelled_reviews(cfg)
    if teacher is None and cfg.distill.enabled and unlabelled is None:
        teacher = run_teacher(cfg, raw, run, teacher_dir)  # a run resumed after training: cached
    branch = fit_ngram_branch(cfg, vectorizer, model, data_mod.decoded(raw.train),
                              data_mod.decoded(raw.validation),
                              teacher.branch if teacher is not None else None, unlabelled)
    ngrams.save(branch, path)
    run.update(ngrams={"n_grams": len(branch.vocabulary), "blend": list(branch.blend),
                       "cotrained_on": len(unlabelled) if unlabelled is not None else 0})
    return branch
