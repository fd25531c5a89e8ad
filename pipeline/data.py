"""Data ingestion: raw (text, label) splits from tensorflow-datasets or an aclImdb-style folder.

Validation is carved deterministically from train; the test split is touched only by
the final evaluation.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import tensorflow as tf

from pipeline.config import DataConfig, PipelineError

CLASS_NAMES = ("neg", "pos")  # label 0, label 1, as in tfds imdb_reviews


class DataError(PipelineError):
    """Data that cannot be read; the message says what to do."""


@dataclass(frozen=True)
class RawSplits:
    """Datasets of (review string, int64 label); `train` is what the vocabulary sees."""

    train: tf.data.Dataset
    validation: tf.data.Dataset
    test: tf.data.Dataset


def _percent(fraction: float) -> int:
    pct = round((1.0 - fraction) * 100)
    return min(max(pct, 1), 99)


def _tfds_splits(cfg: DataConfig, seed: int) -> tuple[tf.data.Dataset, ...]:
    import tensorflow_datasets as tfds

    data_dir = cfg.data_dir or os.environ.get("TFDS_DATA_DIR")
    cut = _percent(cfg.validation_fraction)
    splits = [f"train[:{cut}%]", f"train[{cut}%:]", "test"]
    try:
        # download=False: a missing copy fails fast instead of hanging on the network.
        return tuple(tfds.load(cfg.tfds_name, split=splits, data_dir=data_dir, download=False,
                               as_supervised=True, shuffle_files=False,
                               read_config=tfds.ReadConfig(shuffle_seed=seed)))
    except Exception as exc:  # tfds raises many types; the user needs one message
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(
            f"cannot load tfds dataset {cfg.tfds_name!r} ({first}): set TFDS_DATA_DIR "
            "(or data.data_dir) to a folder holding a prepared copy, e.g. "
            "TFDS_DATA_DIR=../shared/tfds, or use data.source=directory"
        ) from exc


def _check_class_dirs(folder: Path) -> None:
    missing = [c for c in CLASS_NAMES if not (folder / c).is_dir()]
    if missing:
        raise DataError(
            f"{folder} has no {'/'.join(missing)} folder: expected an aclImdb-style layout "
            "with train/pos, train/neg, test/pos and test/neg holding one review per .txt file"
        )
    if not any(next((folder / c).glob("*.txt"), None) for c in CLASS_NAMES):
        raise DataError(f"{folder}: the pos/neg folders hold no .txt files")


def _files_dataset(folder: Path) -> tf.data.Dataset:
    """Reviews of one split in a fixed (sorted) order, so carving is deterministic."""
    paths, labels = [], []
    for label, cls in enumerate(CLASS_NAMES):
        for f in sorted((folder / cls).glob("*.txt")):
            # Checked now, not when tf.data reads it mid-epoch with a C++ traceback.
            if not f.is_file() or not os.access(f, os.R_OK):
                what = "a broken link" if f.is_symlink() and not f.exists() else (
                    "not a regular file" if not f.is_file() else "not readable")
                raise DataError(f"cannot read review file {f}: {what}; remove it or fix it "
                                "(each .txt under pos/neg must be one readable review)")
            paths.append(str(f))
            labels.append(label)
    ds = tf.data.Dataset.from_tensor_slices((tf.constant(paths, tf.string),
                                             tf.constant(labels, tf.int64)))
    return ds.map(lambda p, y: (tf.io.read_file(p), y), num_parallel_calls=tf.data.AUTOTUNE)


def _directory_splits(cfg: DataConfig, seed: int) -> tuple[tf.data.Dataset, ...]:
    root = Path(cfg.directory or "")
    if not root.is_dir():
        raise DataError(f"data.directory {str(root)!r} does not exist")
    for split in ("train", "test"):
        _check_class_dirs(root / split)
    train_all = _files_dataset(root / "train")
    n = int(train_all.cardinality())
    # Files are sorted pos/neg, so shuffle once (seeded, not per epoch) before carving.
    train_all = train_all.shuffle(n, seed=seed, reshuffle_each_iteration=False)
    n_train = int(round(n * (1.0 - cfg.validation_fraction)))
    return train_all.take(n_train), train_all.skip(n_train), _files_dataset(root / "test")


def load_raw(cfg: DataConfig, seed: int) -> RawSplits:
    """Load train / validation / test as (text, label) datasets, capped as configured."""
    if cfg.source == "tfds":
        train, val, test = _tfds_splits(cfg, seed)
    else:
        train, val, test = _directory_splits(cfg, seed)
    if cfg.max_train_examples:
        train = train.take(cfg.max_train_examples)
    if cfg.max_eval_examples:
        val, test = val.take(cfg.max_eval_examples), test.take(cfg.max_eval_examples)
    return RawSplits(train=train, validation=val, test=test)


def count(ds: tf.data.Dataset) -> int:
    """Number of examples (iterates when the cardinality is unknown)."""
    n = int(ds.cardinality())
    if n >= 0:
        return n
    return int(ds.reduce(tf.constant(0, tf.int64), lambda c, _: c + 1))


def check_nonempty(splits: RawSplits, names: tuple[str, ...] = ("train", "validation", "test")
                   ) -> dict[str, int]:
    """Count each named split; an empty one is an error that names it."""
    sizes = {}
    for name in names:
        try:
            n = count(getattr(splits, name))
        except tf.errors.OpError as exc:
            raise DataError(f"cannot read the {name} split: {exc.message.splitlines()[0]}") from None
        if n == 0:
            raise DataError(f"the {name} split is empty: check the data source and the "
                            "max_*_examples / validation_fraction settings")
        sizes[name] = n
    return sizes


def unsupervised_texts(cfg: DataConfig) -> tf.data.Dataset:
    """Unlabelled reviews (tfds `unsupervised` split, or aclImdb train/unsup) for pretraining."""
    if cfg.source == "tfds":
        import tensorflow_datasets as tfds

        data_dir = cfg.data_dir or os.environ.get("TFDS_DATA_DIR")
        try:
            ds = tfds.load(cfg.tfds_name, split="unsupervised", data_dir=data_dir,
                           download=False, as_supervised=True)
        except Exception as exc:
            raise DataError(f"cannot load the unsupervised split of {cfg.tfds_name!r}: {exc}") from exc
        return ds.map(lambda text, _: text)
    folder = Path(cfg.directory or "") / "train" / "unsup"
    files = sorted(str(f) for f in folder.glob("*.txt"))
    return tf.data.Dataset.from_tensor_slices(tf.constant(files, tf.string)).map(tf.io.read_file)


def data_identity(cfg: DataConfig) -> dict:
    """What the data is, not where it lies: part of a run's fingerprint. Reads no reviews.

    tfds: the dataset's name, version and split sizes from the prepared copy's info
    (nothing is downloaded); a folder: a digest of its review files' names and sizes.
    """
    if cfg.source == "tfds":
        import tensorflow_datasets as tfds

        data_dir = cfg.data_dir or os.environ.get("TFDS_DATA_DIR")
        try:
            info = tfds.builder(cfg.tfds_name, data_dir=data_dir).info
        except Exception as exc:  # tfds raises many types; the user needs one message
            raise DataError(f"cannot read the info of tfds dataset {cfg.tfds_name!r}: {exc}") from exc
        return {"source": "tfds", "name": info.full_name, "version": str(info.version),
                "splits": {name: split.num_examples for name, split in sorted(info.splits.items())}}
    root = Path(cfg.directory or "")
    digest = hashlib.sha256()
    files = 0
    for split in ("train", "test"):
        for cls in (*CLASS_NAMES, "unsup"):
            for f in sorted((root / split / cls).glob("*.txt")):
                digest.update(f"{split}/{cls}/{f.name} {f.stat().st_size}\n".encode())
                files += 1
    return {"source": "directory", "files": files, "digest": digest.hexdigest()[:16]}
