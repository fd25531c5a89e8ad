"""Distillation: the unlabelled reviews, scored by a teacher, teach the BiLSTM.

The teacher (`distill.teacher`) is the n-gram regression (`pipeline.ngrams`), fitted on the
training reviews only, or (`served`) the served model of a first run of the same config
taught by that regression: two rounds, the student of the first becoming part of the
teacher of the second. It scores the unlabelled reviews (tfds `unsupervised`, or aclImdb `train/unsup`),
and the BiLSTM (the student) trains on the gold labels plus those soft probabilities:
binary cross-entropy on soft targets, an unlabelled review counting as much as a labelled
one. The student so sees three times the reviews, labelled by a model that reads them
differently (every phrase at once rather than in order). The two rounds are arranged by
`pipeline.rounds`; here are the teachers and the student's training split.

Validation and test text never reach the teacher's fit or the student's training: the
teacher's models are fitted on `train` alone (a `served` teacher's three blend weights on
the validation labels, as every served model's are), and only `train` and the unlabelled
reviews make the student's split.

The teacher and its scores are cached under `pretrain.directory`, keyed by everything that
shapes them (the data, the n-gram settings, the seed), so a rerun, a resumed run or another
config over the same data reuses them; a cache whose reviews no longer match is rebuilt.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf

from pipeline import data as data_mod
from pipeline import ngrams
from pipeline.atomic import atomic_path
from pipeline.config import Config
from pipeline.fingerprint import data_key, fingerprint
from pipeline.scoring import ngram_logits

log = logging.getLogger(__name__)

SERVED_SCORES_FILE = "teacher_scores.npz"  # in a `served` teacher's run folder


@dataclass(frozen=True)
class Teacher:
    """The fitted teacher and its probabilities for the unlabelled reviews, in their order."""

    branch: ngrams.NgramModel | None  # the n-gram regression fitted on train (None: a run without one)
    texts: list[str]  # the unlabelled reviews
    probabilities: np.ndarray  # float32 [len(texts)], P(positive)
    cached: bool  # True: read from the cache, nothing was fitted or scored


def teacher_config(cfg: Config) -> Config:
    """The config of a `served` teacher's run: this one under `<name>-teacher`, taught by the
    n-gram regression. Its served model (BiLSTM + n-gram blend) then teaches this run.

    The teacher trains without the experimental levers: it only labels the unlabelled reviews,
    and what they cost belongs to the model that is served. Its n-gram branch is fitted
    without them (no `ngrams.cotrain`): a teacher whose branch had learned the very reviews it
    labels would hand back its own BiLSTM's labels.
    """
    return cfg.model_copy(update={"name": f"{cfg.name}-teacher",
                                  "experimental": type(cfg.experimental)(),
                                  "ngrams": cfg.ngrams.model_copy(update={"cotrain": False}),
                                  "distill": cfg.distill.model_copy(update={"teacher": "ngrams"})})


def cache_stem(cfg: Config) -> Path:
    """Where this config's teacher lives: the same data, n-gram settings and seed, the same files."""
    key = {"data": data_key(cfg.data.model_dump(exclude={"max_eval_examples", "download", "data_dir"})),
           # cotrain: the teacher's regression never fits the unlabelled reviews (`teacher_config`)
           "ngrams": cfg.ngrams.model_dump(exclude={"enabled", "cotrain"}), "seed": cfg.seed,
           "max_unlabelled": cfg.distill.max_unlabelled, "teacher": cfg.distill.teacher}
    if cfg.data.source == "files":  # files are edited in place: their contents name the teacher
        key["data_identity"] = data_mod.data_identity(cfg.data)
    return Path(cfg.pretrain.directory) / f"teacher-{cfg.distill.teacher}-{fingerprint(key)}"


def texts_digest(texts: list[str]) -> str:
    """A digest of the reviews a cache scored, so a changed unlabelled split is noticed."""
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8", "replace"))
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def unlabelled_reviews(cfg: Config) -> list[str]:
    """The unlabelled reviews, decoded, in a fixed order, capped at `distill.max_unlabelled`."""
    ds = data_mod.unsupervised_texts(cfg.data)
    if cfg.distill.max_unlabelled:
        ds = ds.take(cfg.distill.max_unlabelled)
    texts = [t.decode("utf-8", "replace") for t in ds.as_numpy_iterator()]
    if not texts:
        raise no_unlabelled_reviews()
    return texts


def no_unlabelled_reviews() -> data_mod.DataError:
    return data_mod.DataError(
        "distill.enabled and ngrams.cotrain need unlabelled reviews, and the data source has none "
        "(tfds: an `unsupervised` split; a folder: train/unsup/*.txt; files: data.unlabelled_files); "
        "add some, or set distill.enabled=false ngrams.cotrain=false")


def check_unlabelled(cfg: Config) -> None:
    """Fail before any training when distillation or co-training will want unlabelled reviews
    and the data source has none."""
    wanted = cfg.distill.enabled or (cfg.ngrams.enabled and cfg.ngrams.cotrain)
    if wanted and not any(True for _ in data_mod.unsupervised_texts(cfg.data).take(1)):
        raise no_unlabelled_reviews()


def soft_targets(logits: np.ndarray) -> np.ndarray:
    """P(positive) = sigmoid(logit), the teacher's own probability."""
    return (1.0 / (1.0 + np.exp(-logits))).astype(np.float32)


def ngram_teacher(cfg: Config, train: tuple[list[str], np.ndarray]) -> Teacher:
    """The cached n-gram teacher of this config, or one fitted on `train` and scored on the
    unlabelled reviews (then cached). `train` must be the training split alone."""
    texts = unlabelled_reviews(cfg)
    digest = texts_digest(texts)
    stem = cache_stem(cfg)
    branch_path, scores_path = stem.with_suffix(".npz"), stem.with_suffix(".scores.npz")
    if branch_path.is_file() and scores_path.is_file():
        with np.load(scores_path) as z:
            if str(z["digest"]) == digest:
                log.info("distill: teacher and its scores of %d unlabelled reviews cached at %s",
                         len(texts), scores_path)
                return Teacher(ngrams.load(branch_path), texts, soft_targets(z["logits"]), True)
        log.info("distill: the unlabelled reviews changed since %s was written; scoring again",
                 scores_path)
    t0 = time.time()
    log.info("distill: fitting the n-gram teacher on %d training reviews", len(train[0]))
    branch = ngrams.fit(*train, cfg.ngrams)
    log.info("distill: scoring %d unlabelled reviews", len(texts))
    logits = ngram_logits(branch, texts).astype(np.float32)
    stem.parent.mkdir(parents=True, exist_ok=True)
    ngrams.save(branch, branch_path)
    _save_scores(scores_path, logits, digest)
    probabilities = soft_targets(logits)
    log.info("distill: teacher ready in %.0fs; %.0f%% of its scores are above 0.9 or below 0.1 -> %s",
             time.time() - t0, 100 * confident_share(probabilities), scores_path)
    return Teacher(branch, texts, probabilities, False)


def served_teacher(run_dir: Path, texts: list[str], branch: ngrams.NgramModel | None,
                   logits_of: Callable[[list[str]], np.ndarray] | None = None) -> Teacher:
    """A finished run's served model as the teacher: its logits of `texts`, cached in that
    run's folder beside what they were computed from, or computed now by `logits_of`."""
    path = run_dir / SERVED_SCORES_FILE
    digest = texts_digest(texts)
    if path.is_file():
        with np.load(path) as z:
            if str(z["digest"]) == digest:
                log.info("distill: the teacher run's scores of %d unlabelled reviews cached at %s",
                         len(texts), path)
                return Teacher(branch, texts, soft_targets(z["logits"]), True)
    if logits_of is None:
        raise data_mod.DataError(f"the teacher run {run_dir} has no scores of these unlabelled "
                                 "reviews: train through pipeline.rounds.train_rounds (make train), "
                                 "which scores them in the teacher's round")
    t0 = time.time()
    log.info("distill: the served model of %s scores %d unlabelled reviews", run_dir, len(texts))
    logits = logits_of(texts).astype(np.float32)
    _save_scores(path, logits, digest)
    probabilities = soft_targets(logits)
    log.info("distill: teacher ready in %.0fs; %.0f%% of its scores are above 0.9 or below 0.1 -> %s",
             time.time() - t0, 100 * confident_share(probabilities), path)
    return Teacher(branch, texts, probabilities, False)


def _save_scores(path: Path, logits: np.ndarray, digest: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, tmp.open("wb") as f:
        np.savez(f, logits=logits, digest=np.array(digest))


def confident_share(probabilities: np.ndarray) -> float:
    """The share of reviews the teacher is sure of (above 0.9 or below 0.1)."""
    return float(np.mean((probabilities > 0.9) | (probabilities < 0.1)))


def student_split(raw_train: tf.data.Dataset, t: Teacher) -> tf.data.Dataset:
    """(text, target) rows: the gold training reviews (target 0/1), then the unlabelled ones
    (target: the teacher's probability)."""
    gold = raw_train.map(lambda text, y: (text, tf.cast(y, tf.float32)))
    soft = tf.data.Dataset.from_tensor_slices(
        (tf.constant(t.texts, tf.string), tf.constant(t.probabilities, tf.float32)))
    return gold.concatenate(soft)
