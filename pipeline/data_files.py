"""The `files` data source: CSV, TSV or JSON-lines files (`data.train_files`, and
`data.test_files`, `data.unlabelled_files`), read by `pipeline.tables`.

One of the three source adapters behind `pipeline.data` (`splits`, `unsupervised_texts`,
`identity`). Every row is checked before training; the training rows are carved into the
splits class by class, so that each split holds both classes.
"""

from __future__ import annotations

import logging
from collections import Counter

import numpy as np
import tensorflow as tf

from pipeline import table_files, tables
from pipeline.config import DataConfig
from pipeline.errors import DataError

log = logging.getLogger(__name__)


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


def splits(cfg: DataConfig, seed: int
           ) -> tuple[tuple[tf.data.Dataset, ...], tuple[str, ...], tuple[str, str]]:
    """The three splits of data.train_files (and data.test_files), no record files, and the
    label names.

    Every row is read and checked now, once (the unlabelled files' too); the datasets then
    read their rows from the files by position. The training rows are carved class by class
    in a seeded random order: test (without test files) first, then validation.
    """
    train_paths = table_files.expand(cfg.train_files or "", "train_files")
    test_paths = table_files.expand(cfg.test_files, "test_files") if cfg.test_files else None
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
            _rows_dataset(test_table, test_labels, test_rows)), (), names


def unlabelled_table(cfg: DataConfig) -> tables.Table:
    """data.unlabelled_files, every row checked (empty texts are left out, and counted)."""
    paths = table_files.expand(cfg.unlabelled_files or "", "unlabelled_files")
    return tables.scan(paths, cfg.text_column, None, cfg.skip_bad_rows, "unlabelled_files",
                       empty_text_ok=True)


def unsupervised_texts(cfg: DataConfig) -> tf.data.Dataset | None:
    """The rows of data.unlabelled_files, or None if it is not set."""
    if not cfg.unlabelled_files:
        return None
    table = unlabelled_table(cfg)
    return tf.data.Dataset.from_generator(lambda: tables.read_texts(table, np.arange(len(table))),
                                          output_signature=tf.TensorSpec([], tf.string))


def identity(cfg: DataConfig) -> dict:
    """A digest of each role's file contents, so an edited file is other data."""
    roles = {"train": cfg.train_files, "test": cfg.test_files, "unlabelled": cfg.unlabelled_files}
    # "split": rows are carved class by class; runs carved the old way are not resumed.
    return {"source": "files", "split": "stratified"} | {
        role: table_files.content_digest(table_files.expand(pattern, f"{role}_files"))
        for role, pattern in roles.items() if pattern}
