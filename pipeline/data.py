"""Data ingestion: raw (text, label) splits from tensorflow-datasets or an aclImdb-style folder.

Validation is carved deterministically from train; the test split is touched only by
the final evaluation.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf

from pipeline.config import DataConfig
from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

CLASS_NAMES = ("neg", "pos")  # label 0, label 1, as in tfds imdb_reviews
PROBE_TIMEOUT = 10.0  # seconds to wait for the download host before calling tfds (which retries for minutes)


class DataError(PipelineError):
    """Data that cannot be read; the message says what to do."""


@dataclass(frozen=True)
class RawSplits:
    """Datasets of (review string, int64 label); `train` is what the vocabulary sees."""

    train: tf.data.Dataset
    validation: tf.data.Dataset
    test: tf.data.Dataset
    files: tuple[str, ...] = ()  # record files behind the splits, to name a corrupt one


def _percent(fraction: float) -> int:
    pct = round((1.0 - fraction) * 100)
    return min(max(pct, 1), 99)


def tfds_data_dir(cfg: DataConfig) -> str | None:
    """Where tfds keeps prepared datasets: data.data_dir, then $TFDS_DATA_DIR, then tfds's default."""
    return cfg.data_dir or os.environ.get("TFDS_DATA_DIR") or None


def _tfds_hint(cfg: DataConfig, why: str) -> DataError:
    return DataError(
        f"cannot load tfds dataset {cfg.tfds_name!r} ({why}): point TFDS_DATA_DIR (or "
        "data.data_dir) at a prepared copy, a tfds data dir holding the built dataset: make one "
        f"on a machine with internet (`tfds build {cfg.tfds_name}`, or "
        f"`tfds.load(\"{cfg.tfds_name}\", download=True)`), then copy its data dir (default "
        "~/tensorflow_datasets) to this machine; or use data.source=directory with an aclImdb-style folder"
    )


def unreachable(url: str, timeout: float = PROBE_TIMEOUT) -> str | None:
    """None if the server of `url` answers within `timeout` seconds, else why not.

    A HEAD request through urllib (so proxy settings apply), in a thread so that a slow
    name lookup, which a socket timeout does not cover, is bounded too.
    """
    outcome: list[str | None] = []

    def probe() -> None:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
                outcome.append(None)
        except urllib.error.HTTPError:  # an HTTP status is an answer
            outcome.append(None)
        except (urllib.error.URLError, OSError, ValueError) as exc:
            outcome.append(str(getattr(exc, "reason", exc)))

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return outcome[0] if outcome else f"no answer within {timeout:g} s"


def _tfds_download(cfg: DataConfig, builder) -> bool:
    """Whether tfds.load may download: data.download, and for `auto` a quick look at the network."""
    if cfg.download != "auto":
        return cfg.download == "always"
    if builder.is_prepared():
        return False
    url = next(iter(builder.url_infos or {}), None)  # from the dataset's checksums file
    why = unreachable(url) if url else None
    if why:
        raise _tfds_hint(cfg, f"no prepared copy in {builder.data_dir} and its download "
                              f"server cannot be reached: {why}")
    log.info("no prepared copy of %s in %s: downloading and preparing it (once)",
             cfg.tfds_name, builder.data_dir)
    return True


def _tfds_splits(cfg: DataConfig, seed: int) -> tuple[tuple[tf.data.Dataset, ...], tuple[str, ...]]:
    """The three splits, and the record files they read."""
    import tensorflow_datasets as tfds

    data_dir = tfds_data_dir(cfg)
    cut = _percent(cfg.validation_fraction)
    splits = [f"train[:{cut}%]", f"train[{cut}%:]", "test"]
    try:
        builder = tfds.builder(cfg.tfds_name, data_dir=data_dir)
        download = _tfds_download(cfg, builder)
        datasets = tuple(tfds.load(cfg.tfds_name, split=splits, data_dir=data_dir, download=download,
                                   as_supervised=True, shuffle_files=False,
                                   read_config=tfds.ReadConfig(shuffle_seed=seed)))
    except DataError:
        raise
    except Exception as exc:  # tfds raises many types; the user needs one message
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise _tfds_hint(cfg, first) from exc
    files = tuple(sorted(str(f) for f in Path(builder.data_dir).glob("*.tfrecord*")))
    return datasets, files


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
    files: tuple[str, ...] = ()
    if cfg.source == "tfds":
        (train, val, test), files = _tfds_splits(cfg, seed)
    else:
        train, val, test = _directory_splits(cfg, seed)
    if cfg.max_train_examples:
        train = train.take(cfg.max_train_examples)
    if cfg.max_eval_examples:
        val, test = val.take(cfg.max_eval_examples), test.take(cfg.max_eval_examples)
    return RawSplits(train=train, validation=val, test=test, files=files)


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
    """Unlabelled reviews (tfds `unsupervised` split, or aclImdb train/unsup) for pretraining."""
    if cfg.source == "tfds":
        import tensorflow_datasets as tfds

        data_dir = tfds_data_dir(cfg)
        try:
            builder = tfds.builder(cfg.tfds_name, data_dir=data_dir)
            ds = tfds.load(cfg.tfds_name, split="unsupervised", data_dir=data_dir,
                           download=_tfds_download(cfg, builder), as_supervised=True)
        except DataError:
            raise
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

        try:
            info = tfds.builder(cfg.tfds_name, data_dir=tfds_data_dir(cfg)).info
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
