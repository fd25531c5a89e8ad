"""Data ingestion: raw (text, label) splits from tensorflow-datasets, an aclImdb-style folder,
or CSV/TSV/JSONL files, with the names of the two labels.

Each source is one adapter module with the same three functions, picked by `data.source`
(`SOURCES`): `splits(cfg, seed)` gives the three splits, the record files behind them (to
name a corrupt one) and the label names; `unsupervised_texts(cfg)` the unlabelled reviews
(None where there are none); `identity(cfg)` what the data is, for the run's fingerprint.
This module holds what is the same for all of them.

Validation is carved deterministically from train (and, for files without test files, the
test split too, first); the test split is touched only by the final evaluation. How each
source maps onto the three splits: docs/data.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from pipeline import data_directory, data_files, data_tfds
from pipeline.config import DataConfig
from pipeline.constants import LABELS
from pipeline.errors import DataError

SOURCES = {"tfds": data_tfds, "directory": data_directory, "files": data_files}  # data.source: adapter
tfds_split = data_tfds.named_split  # one tfds split by its name, for scoring a model on it


@dataclass(frozen=True)
class RawSplits:
    """Datasets of (review string, int64 label); `train` is what the vocabulary sees."""

    train: tf.data.Dataset
    validation: tf.data.Dataset
    test: tf.data.Dataset
    files: tuple[str, ...] = ()  # record files behind the splits, to name a corrupt one
    labels: tuple[str, str] = LABELS  # the names of label 0 and label 1 (the positive one)


def load_raw(cfg: DataConfig, seed: int) -> RawSplits:
    """Load train / validation / test as (text, label) datasets, capped as configured."""
    (train, val, test), files, labels = SOURCES[cfg.source].splits(cfg, seed)
    if cfg.max_train_examples:
        train = train.take(cfg.max_train_examples)
    if cfg.max_eval_examples:
        val, test = val.take(cfg.max_eval_examples), test.take(cfg.max_eval_examples)
    return RawSplits(train=train, validation=val, test=test, files=files, labels=labels)


def decoded(ds: tf.data.Dataset) -> tuple[list[str], np.ndarray]:
    """A raw split's reviews (invalid UTF-8 replaced) and int64 labels, in order."""
    pairs = [(t.decode("utf-8", "replace"), int(y)) for t, y in ds.as_numpy_iterator()]
    return [t for t, _ in pairs], np.array([y for _, y in pairs], dtype=np.int64)


def count(ds: tf.data.Dataset) -> int:
    """Number of examples (iterates when the cardinality is unknown)."""
    n = int(ds.cardinality())
    if n >= 0:
        return n
    return int(ds.reduce(tf.constant(0, tf.int64), lambda c, _: c + 1))


def unreadable_file(files: tuple[str, ...]) -> tuple[str, str] | None:
    """The first record file that does not read back whole (with the reason), or None."""
    for path in files:
        try:
            for _ in tf.data.TFRecordDataset(path):
                pass
        except tf.errors.OpError as exc:
            return path, exc.message.splitlines()[0]
    return None


def check_nonempty(splits: RawSplits, names: tuple[str, ...] = ("train", "validation", "test")
                   ) -> dict[str, int]:
    """Read each named split once, whole, and count it: before any epoch, not in the middle of one.

    An unreadable record (a truncated or corrupted file) or an empty split is an error that
    names the file or the split.
    """
    sizes = {}
    for name in names:
        ds = getattr(splits, name)
        try:
            n = int(ds.reduce(tf.constant(0, tf.int64), lambda c, _: c + 1))
        except tf.errors.OpError as exc:
            bad = unreadable_file(splits.files)
            if bad:
                raise DataError(f"cannot read the {name} split: {bad[0]} is damaged ({bad[1]}); "
                                "prepare the dataset again or restore the file") from None
            raise DataError(f"cannot read the {name} split: {exc.message.splitlines()[0]}") from None
        if n == 0:
            raise DataError(f"the {name} split is empty: check the data source and the "
                            "max_*_examples / validation_fraction settings")
        sizes[name] = n
    return sizes


def unsupervised_texts(cfg: DataConfig) -> tf.data.Dataset:
    """Unlabelled reviews for pretraining: the tfds `unsupervised` split (none if the dataset
    has no such split), aclImdb train/unsup, or data.unlabelled_files (none if not set)."""
    texts = SOURCES[cfg.source].unsupervised_texts(cfg)
    return texts if texts is not None else tf.data.Dataset.from_tensor_slices(tf.constant([], tf.string))


def data_identity(cfg: DataConfig) -> dict:
    """What the data is, not where it lies: part of a run's fingerprint. Reads no reviews.

    tfds: the dataset's name, version and split sizes from the prepared copy's info
    (nothing is downloaded); a folder: a digest of its review files' names and sizes;
    files: a digest of each role's file contents, so an edited file is other data.
    """
    return SOURCES[cfg.source].identity(cfg)
