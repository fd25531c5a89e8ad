"""Data ingestion: raw (text, label) splits from tensorflow-datasets, an aclImdb-style folder,
or CSV/TSV/JSONL files (read by `pipeline.tables`), with the names of the two labels.

Validation is carved deterministically from train (and, for files without test files, the
test split too, first); the test split is touched only by the final evaluation. How each
source maps onto the three splits: docs/data.md.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf

from pipeline import tables
from pipeline.config import DataConfig
from pipeline.constants import LABELS
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
    labels: tuple[str, str] = LABELS  # the names of label 0 and label 1 (the positive one)


def _percent(fraction: float) -> int:
    pct = round((1.0 - fraction) * 100)
    return min(max(pct, 1), 99)


def tfds_data_dir(cfg: DataConfig) -> str | None:
    """Where tfds keeps prepared datasets: data.data_dir, then $TFDS_DATA_DIR, then tfds's default."""
    return cfg.data_dir or os.environ.get("TFDS_DATA_DIR") or None


def _tfds_hint(cfg: DataConfig, why: str) -> DataError:
    return DataError(f"cannot load tfds dataset {cfg.tfds_name!r} ({why}): set TFDS_DATA_DIR (or "
                     "data.data_dir) to a prepared copy, the data dir of a machine with internet "
                     f"after `tfds build {cfg.tfds_name}`; or use data.source=directory or files")


def _tfds_failure(cfg: DataConfig, builder, exc: Exception) -> DataError:
    """One line for a failed tfds load: tfds's own words for a missing copy are advice for
    Python callers, and its other messages run to several lines."""
    if not builder.is_prepared():
        return _tfds_hint(cfg, f"no prepared copy in {builder.data_dir}")
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return _tfds_hint(cfg, first[:200])


def _tfds_builder(cfg: DataConfig):
    """tfds's builder of data.tfds_name; an unknown name is one line with the nearest names."""
    import difflib

    import tensorflow_datasets as tfds

    try:
        return tfds.builder(cfg.tfds_name, data_dir=tfds_data_dir(cfg))
    except tfds.core.registered.DatasetNotFoundError:
        base = cfg.tfds_name.split("/")[0].split(":")[0]
        near = difflib.get_close_matches(base, set(tfds.list_builders(with_community_datasets=False)), n=1)
        raise DataError(f"data.tfds_name: tensorflow-datasets has no dataset {base!r}"
                        + (f"; did you mean {near[0]!r}?" if near else
                           " (`tfds.list_builders()` lists them)")) from None


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


def _tfds_keys(cfg: DataConfig, info) -> tuple[str, str, bool]:
    """(text feature, label feature, whether they are the supervised keys) of a tfds dataset."""
    supervised = tuple(info.supervised_keys or ())[:2]
    text_key = cfg.text_key or (supervised[0] if supervised else "text")
    label_key = cfg.label_key or (supervised[1] if supervised else "label")
    features = list(info.features.keys())
    for what, key in (("text_key", text_key), ("label_key", label_key)):
        if key not in features:
            raise DataError(f"tfds dataset {cfg.tfds_name!r} has no feature {key!r} (features: "
                            f"{', '.join(features)}); set data.{what}")
    return text_key, label_key, (text_key, label_key) == supervised


def _tfds_labels(cfg: DataConfig, info, label_key: str) -> tuple[tuple[str, str], bool]:
    """The label names (the ClassLabel's, else data.labels or 0/1), and whether to flip the labels
    because data.labels names the ClassLabel's classes the other way round."""
    import tensorflow_datasets as tfds

    feature = info.features[label_key]
    given = cfg.label_names()
    if not isinstance(feature, tfds.features.ClassLabel):
        return given or ("0", "1"), False
    names = tuple(feature.names)
    if len(names) != 2:
        more = "; multi-class is not supported yet" if len(names) > 2 else ""
        raise DataError(f"tfds dataset {cfg.tfds_name!r}: {label_key!r} has {len(names)} "
                        f"class(es) ({', '.join(names)}): exactly two are needed{more}")
    if given is not None and set(given) != set(names):
        raise DataError(f"data.labels {list(given)} are not the classes of {cfg.tfds_name!r}'s "
                        f"{label_key!r} ({', '.join(names)})")
    return (given or names), given is not None and given != names


def _tfds_splits(cfg: DataConfig, seed: int
                 ) -> tuple[tuple[tf.data.Dataset, ...], tuple[str, ...], tuple[str, str]]:
    """The three splits, the record files they read, and the label names."""
    import tensorflow_datasets as tfds

    data_dir = tfds_data_dir(cfg)
    cut = _percent(cfg.validation_fraction)
    train, test = cfg.train_split, cfg.test_split
    splits = [f"{train}[:{cut}%]", f"{train}[{cut}%:]", test]
    builder = _tfds_builder(cfg)
    try:
        text_key, label_key, supervised = _tfds_keys(cfg, builder.info)
        labels, flip = _tfds_labels(cfg, builder.info, label_key)
        download = _tfds_download(cfg, builder)
        datasets = tuple(tfds.load(cfg.tfds_name, split=splits, data_dir=data_dir, download=download,
                                   as_supervised=supervised, shuffle_files=False,
                                   read_config=tfds.ReadConfig(shuffle_seed=seed)))
    except DataError:
        raise
    except Exception as exc:  # tfds raises many types; the user needs one message
        raise _tfds_failure(cfg, builder, exc) from exc
    if not supervised:
        datasets = tuple(ds.map(lambda ex: (ex[text_key], tf.cast(ex[label_key], tf.int64)))
                         for ds in datasets)
    if flip:
        datasets = tuple(ds.map(lambda t, y: (t, 1 - tf.cast(y, tf.int64))) for ds in datasets)
    files = tuple(sorted(str(f) for f in Path(builder.data_dir).glob("*.tfrecord*")))
    return datasets, files, labels


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


def _rows_dataset(table: tables.Table, labels: np.ndarray, rows: np.ndarray) -> tf.data.Dataset:
    """(text, label) of `rows` of `table`, in that order, read from the files on each pass."""
    def generate():
        yield from zip(tables.read_texts(table, rows), labels[rows].tolist(), strict=True)

    ds = tf.data.Dataset.from_generator(generate, output_signature=(
        tf.TensorSpec([], tf.string), tf.TensorSpec([], tf.int64)))
    return ds.apply(tf.data.experimental.assert_cardinality(len(rows)))


def stratified_split(labels: np.ndarray, fractions: tuple[float, ...], rng: np.random.Generator,
                     names: tuple[str, str], split_names: tuple[str, ...], key: str) -> list[np.ndarray]:
    """Row indices of each split: carved class by class, so that every split holds both.

    Each fraction takes its share of the rows its class has left (at least one row), in the
    order given; what is left of each class is the last split (train). Each split's rows are
    then shuffled together, so a file sorted by label still mixes within every split.
    A class with fewer rows than there are splits is an error that says how many it needs.
    """
    need = len(fractions) + 1
    parts: list[list[np.ndarray]] = [[] for _ in range(need)]
    for label, name in enumerate(names):
        rows = rng.permutation(np.flatnonzero(labels == label))
        if len(rows) < need:
            raise DataError(f"data.{key}: the class {name!r} has {len(rows)} row(s), too few to put one "
                            f"in each of {', '.join(split_names)}: each class needs at least {need}"
                            + (" (or give data.test_files)" if need == 3 else ""))
        for j, fraction in enumerate(fractions):
            take = min(max(1, round(len(rows) * fraction)), len(rows) - (need - 1 - j))
            parts[j].append(rows[:take])
            rows = rows[take:]
        parts[-1].append(rows)
    return [rng.permutation(np.concatenate(p)) for p in parts]


def _class_counts(labels: np.ndarray, names: tuple[str, str]) -> str:
    counts = np.bincount(labels, minlength=2)
    return f"{names[0]} {counts[0]} / {names[1]} {counts[1]}"


def _files_splits(cfg: DataConfig, seed: int) -> tuple[tuple[tf.data.Dataset, ...], tuple[str, str]]:
    """The three splits of data.train_files (and data.test_files), and the label names.

    Every row is read and checked now, once (the unlabelled files' too); the datasets then
    read their rows from the files by position. The training rows are carved class by class
    in a seeded random order: test (without test files) first, then validation.
    """
    train_paths = tables.expand(cfg.train_files or "", "train_files")
    test_paths = tables.expand(cfg.test_files, "test_files") if cfg.test_files else None
    if cfg.unlabelled_files:  # read in full only by pretraining and the teacher: checked now
        unlabelled_table(cfg)
    table = tables.scan(train_paths, cfg.text_column, cfg.label_column, cfg.skip_bad_rows,
                        "train_files")
    names = tables.class_names(table, cfg.label_names(), cfg.label_column, "train_files")
    labels = tables.binary_labels(table, names, "train_files")
    rng = np.random.default_rng(seed)
    if test_paths is not None:
        test_table = tables.scan(test_paths, cfg.text_column, cfg.label_column, cfg.skip_bad_rows,
                                 "test_files")
        test_labels = tables.binary_labels(test_table, names, "test_files")
        # Shuffled too, so max_eval_examples takes both classes from a file sorted by label.
        test_rows = rng.permutation(len(test_table))
        val_rows, train_rows = stratified_split(labels, (cfg.validation_fraction,), rng, names,
                                                ("train", "validation"), "train_files")
    else:
        test_table, test_labels = table, labels
        test_rows, val_rows, train_rows = stratified_split(
            labels, (cfg.test_fraction, cfg.validation_fraction), rng, names,
            ("train", "validation", "test"), "train_files")
    tables_read = [table] + ([test_table] if test_paths is not None else [])
    read = sum(t.rows_read for t in tables_read)
    skipped = Counter()
    for t in tables_read:
        skipped.update(t.skipped)
    log.info("data: %d row(s) read, %d skipped (%s); labels %r (0) and %r (1, positive); train %s, "
             "validation %s, test %s", read, sum(skipped.values()), tables.describe_skipped(skipped),
             *names, _class_counts(labels[train_rows], names), _class_counts(labels[val_rows], names),
             _class_counts(test_labels[test_rows], names))
    return (_rows_dataset(table, labels, train_rows), _rows_dataset(table, labels, val_rows),
            _rows_dataset(test_table, test_labels, test_rows)), names


def unlabelled_table(cfg: DataConfig) -> tables.Table:
    """data.unlabelled_files, every row checked (empty texts are left out, and counted)."""
    paths = tables.expand(cfg.unlabelled_files or "", "unlabelled_files")
    return tables.scan(paths, cfg.text_column, None, cfg.skip_bad_rows, "unlabelled_files",
                       empty_text_ok=True)


def load_raw(cfg: DataConfig, seed: int) -> RawSplits:
    """Load train / validation / test as (text, label) datasets, capped as configured."""
    files: tuple[str, ...] = ()
    labels = LABELS
    if cfg.source == "tfds":
        (train, val, test), files, labels = _tfds_splits(cfg, seed)
    elif cfg.source == "files":
        (train, val, test), labels = _files_splits(cfg, seed)
    else:
        train, val, test = _directory_splits(cfg, seed)
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


def _no_texts() -> tf.data.Dataset:
    return tf.data.Dataset.from_tensor_slices(tf.constant([], tf.string))


def unsupervised_texts(cfg: DataConfig) -> tf.data.Dataset:
    """Unlabelled reviews for pretraining: the tfds `unsupervised` split (none if the dataset
    has no such split), aclImdb train/unsup, or data.unlabelled_files (none if not set)."""
    if cfg.source == "files":
        if not cfg.unlabelled_files:
            return _no_texts()
        table = unlabelled_table(cfg)
        return tf.data.Dataset.from_generator(lambda: tables.read_texts(table, np.arange(len(table))),
                                              output_signature=tf.TensorSpec([], tf.string))
    if cfg.source == "tfds":
        import tensorflow_datasets as tfds

        data_dir = tfds_data_dir(cfg)
        builder = _tfds_builder(cfg)
        try:
            if "unsupervised" not in builder.info.splits:
                return _no_texts()
            text_key, _, supervised = _tfds_keys(cfg, builder.info)
            ds = tfds.load(cfg.tfds_name, split="unsupervised", data_dir=data_dir,
                           download=_tfds_download(cfg, builder), as_supervised=supervised)
        except DataError:
            raise
        except Exception as exc:
            if not builder.is_prepared():
                raise _tfds_hint(cfg, f"no prepared copy in {builder.data_dir}") from exc
            raise DataError(f"cannot load the unsupervised split of {cfg.tfds_name!r}: {exc}") from exc
        return ds.map(lambda text, _: text) if supervised else ds.map(lambda ex: ex[text_key])
    folder = Path(cfg.directory or "") / "train" / "unsup"
    files = sorted(str(f) for f in folder.glob("*.txt"))
    return tf.data.Dataset.from_tensor_slices(tf.constant(files, tf.string)).map(tf.io.read_file)


def data_identity(cfg: DataConfig) -> dict:
    """What the data is, not where it lies: part of a run's fingerprint. Reads no reviews.

    tfds: the dataset's name, version and split sizes from the prepared copy's info
    (nothing is downloaded); a folder: a digest of its review files' names and sizes;
    files: a digest of each role's file contents, so an edited file is other data.
    """
    if cfg.source == "files":
        roles = {"train": cfg.train_files, "test": cfg.test_files, "unlabelled": cfg.unlabelled_files}
        # "split": rows are carved class by class; runs carved the old way are not resumed.
        return {"source": "files", "split": "stratified"} | {
            role: tables.content_digest(tables.expand(pattern, f"{role}_files"))
            for role, pattern in roles.items() if pattern}
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


def tfds_split(cfg: DataConfig, split: str
               ) -> tuple[tf.data.Dataset, tuple[str, ...] | None, int | None, str]:
    """One split of tfds dataset `data.tfds_name` as (text, label) pairs, in the dataset's order,
    for scoring a model on it; the label's class names (None when it is not a ClassLabel), the
    split's size where the prepared copy records it, and the label feature's name. `split` may
    be sliced (`test[:10%]`)."""
    import tensorflow_datasets as tfds

    data_dir = tfds_data_dir(cfg)
    builder = _tfds_builder(cfg)
    try:
        text_key, label_key, supervised = _tfds_keys(cfg, builder.info)
        download = _tfds_download(cfg, builder)
        known = list(builder.info.splits)
        if known and split.split("[")[0] not in known:
            raise DataError(f"tfds dataset {cfg.tfds_name!r} has no split {split!r} (splits: "
                            f"{', '.join(known)})")
        ds = tfds.load(cfg.tfds_name, split=split, data_dir=data_dir, download=download,
                       as_supervised=supervised, shuffle_files=False)
        size = builder.info.splits[split].num_examples if known else None
    except DataError:
        raise
    except Exception as exc:  # tfds raises many types; the user needs one message
        raise _tfds_failure(cfg, builder, exc) from exc
    if not supervised:
        ds = ds.map(lambda ex: (ex[text_key], ex[label_key]))
    feature = builder.info.features[label_key]
    names = tuple(feature.names) if isinstance(feature, tfds.features.ClassLabel) else None
    return ds, names, size, label_key
