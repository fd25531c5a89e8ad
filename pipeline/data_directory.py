"""The `directory` data source: an aclImdb-style folder (`data.directory`) with
train/{pos,neg}, test/{pos,neg} and train/unsup holding one review per .txt file.

One of the three source adapters behind `pipeline.data` (`splits`, `unsupervised_texts`,
`identity`).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import tensorflow as tf

from pipeline.config import DataConfig
from pipeline.constants import LABELS
from pipeline.errors import DataError

CLASS_NAMES = ("neg", "pos")  # label 0, label 1, as in tfds imdb_reviews


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


def splits(cfg: DataConfig, seed: int
           ) -> tuple[tuple[tf.data.Dataset, ...], tuple[str, ...], tuple[str, str]]:
    """The three splits (validation carved from train/ after one seeded shuffle), no record
    files, and the label names."""
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
    return (train_all.take(n_train), train_all.skip(n_train), _files_dataset(root / "test")), (), LABELS


def unsupervised_texts(cfg: DataConfig) -> tf.data.Dataset:
    """train/unsup/*.txt, in sorted order."""
    folder = Path(cfg.directory or "") / "train" / "unsup"
    files = sorted(str(f) for f in folder.glob("*.txt"))
    return tf.data.Dataset.from_tensor_slices(tf.constant(files, tf.string)).map(tf.io.read_file)


def identity(cfg: DataConfig) -> dict:
    """A digest of the review files' names and sizes (the reviews are not read)."""
    root = Path(cfg.directory or "")
    digest = hashlib.sha256()
    files = 0
    for split in ("train", "test"):
        for cls in (*CLASS_NAMES, "unsup"):
            for f in sorted((root / split / cls).glob("*.txt")):
                digest.update(f"{split}/{cls}/{f.name} {f.stat().st_size}\n".encode())
                files += 1
    return {"source": "directory", "files": files, "digest": digest.hexdigest()[:16]}
