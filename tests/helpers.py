"""Builders shared by the tests: tiny generated reviews and datasets, configs, interruptions,
and the stand-ins a test puts in place of a pipeline function (`spy`, `forbid`).

Plain functions and constants, imported by the test files that use them; the fixtures that
wrap them live in conftest.py.
"""

from __future__ import annotations

import inspect
import os
import random
import signal
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

POSITIVE = "great wonderful excellent superb moving brilliant loved beautiful".split()
NEGATIVE = "awful terrible boring dull waste poor hated ugly".split()
NEUTRAL = "the movie film plot actor scene story was and it this a".split()


class StopAt(keras.callbacks.Callback):
    """Ctrl-C at the start of epoch `epoch` (0-based), once the previous epoch's backup is written."""

    def __init__(self, epoch: int):
        super().__init__()
        self.epoch = epoch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.epoch:
            raise KeyboardInterrupt


def make_review(rng: random.Random, label: int) -> str:
    words = POSITIVE if label else NEGATIVE
    body = [rng.choice(words if rng.random() < 0.4 else NEUTRAL) for _ in range(rng.randint(5, 40))]
    return " ".join(body).capitalize() + ".<br /><br />" + rng.choice(words).upper() + "!"


def write_aclimdb(root: Path, n_train: int = 120, n_test: int = 40, seed: int = 0) -> Path:
    """An aclImdb-style folder: {train,test}/{pos,neg}/<id>_<stars>.txt."""
    rng = random.Random(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        for label, cls in enumerate(("neg", "pos")):
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n // 2):
                (folder / f"{i}_{8 if label else 2}.txt").write_text(make_review(rng, label))
    return root


def add_unlabelled(root: Path, n: int = 60, seed: int = 7) -> Path:
    """Unlabelled reviews in the tiny aclImdb folder's train/unsup, as aclImdb ships them."""
    rng = random.Random(seed)
    (root / "train" / "unsup").mkdir()
    for i in range(n):
        (root / "train" / "unsup" / f"{i}_0.txt").write_text(f"unlabelled {i}. " + make_review(rng, i % 2))
    return root


def tiny_overrides(imdb: Path, out: Path) -> list[str]:
    return [
        "name=tiny",
        f"runs_dir={out / 'runs'}",
        f"export.dir={out / 'saved_models'}",
        "data.source=directory",
        f"data.directory={imdb}",
        "data.validation_fraction=0.25",
        "vectorize.max_tokens=100",
        "vectorize.max_length=32",
        "model.embedding_dim=8",
        "model.lstm_units=8",
        "model.dropout=0.0",
        "model.learning_rate=0.01",
        "train.epochs=4",
        "train.batch_size=16",
        "train.verbose=0",
        "train.early_stopping_patience=4",
        f"tune.directory={out / 'tuning'}",
    ]


# Resume tests (test_runs.py): no early stop, so every epoch runs and an interruption
# always lands with epochs still to go; dropout, so the restored seed states matter.
RESUME_EPOCHS = 6
RESUME_EXTRA = [f"train.epochs={RESUME_EPOCHS}", f"train.early_stopping_patience={RESUME_EPOCHS}",
                "model.dropout=0.3"]


def sigmoid(z) -> np.ndarray:
    """P(positive) of a logit, written out here so that no test checks the pipeline's sigmoid
    against itself."""
    return 1.0 / (1.0 + np.exp(-np.asarray(z, dtype=np.float64)))


class Spy:
    """Calls through to `fn` and records each call's arguments by name, defaults filled in:
    `spy.calls[0]["texts"]`. `spy.fn` is the real function."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []
        self._signature = inspect.signature(fn)

    def __call__(self, *args, **kwargs):
        bound = self._signature.bind(*args, **kwargs)
        bound.apply_defaults()
        self.calls.append(dict(bound.arguments))
        return self.fn(*args, **kwargs)


def spy(monkeypatch: pytest.MonkeyPatch, owner, name: str) -> Spy:
    """Put a Spy in place of `owner.<name>` for the rest of the test."""
    recorder = Spy(getattr(owner, name))
    monkeypatch.setattr(owner, name, recorder)
    return recorder


def forbid(monkeypatch: pytest.MonkeyPatch, owner, name: str, why: str) -> None:
    """`owner.<name>` fails the test with `why` if anything calls it (e.g. a refit that a cache
    should have saved)."""

    def forbidden(*args, **kwargs):
        raise AssertionError(why)

    monkeypatch.setattr(owner, name, forbidden)


class TinyReviews(tfds.core.GeneratorBasedBuilder):
    """A tfds dataset built from memory, so a real prepared copy (tfrecord files) exists offline."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "text": tfds.features.Text(),
                "label": tfds.features.ClassLabel(names=["neg", "pos"])}),
            supervised_keys=("text", "label"))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(60), "test": self._generate_examples(20)}

    def _generate_examples(self, n):
        for i in range(n):
            yield i, {"text": f"review number {i} " + "good " * (i % 7), "label": i % 2}


def tiny_tfds(data_dir: Path) -> Path:
    """Prepare TinyReviews under `data_dir`; returns its train record file."""
    builder = TinyReviews(data_dir=str(data_dir))
    builder.download_and_prepare()
    return next(Path(builder.data_dir).glob("tiny_reviews-train.tfrecord*"))


def damage(path: Path, how: str) -> None:
    raw = path.read_bytes()
    if how == "truncated":
        path.write_bytes(raw[: len(raw) // 2])
    else:  # one flipped byte in the middle: the record's checksum no longer matches
        i = len(raw) // 2
        path.write_bytes(raw[:i] + bytes([raw[i] ^ 0xFF]) + raw[i + 1:])


def ctrl_c_inside_tensorflow(monkeypatch: pytest.MonkeyPatch) -> None:
    """Send Ctrl-C while TensorFlow builds an OutOfRangeError, as at an epoch's end in CI.

    The interrupt is raised inside the exception's constructor, called from C++, and pybind11
    turns it into a RuntimeError: that is what reaches the caller, unless a handler raises
    something else first.
    """
    from tensorflow.python.framework import errors_impl

    if signal.getsignal(signal.SIGINT) in (signal.SIG_IGN, signal.SIG_DFL, None):
        # ignored (a background job, nohup): nothing would happen; default: pytest would die
        raise RuntimeError("SIGINT has no Python handler here: use the default_sigint fixture")
    build = errors_impl.OutOfRangeError.__init__

    def interrupted(self, *args, **kwargs):
        monkeypatch.setattr(errors_impl.OutOfRangeError, "__init__", build)  # once
        os.kill(os.getpid(), signal.SIGINT)
        build(self, *args, **kwargs)

    monkeypatch.setattr(errors_impl.OutOfRangeError, "__init__", interrupted)
    batches = iter(tf.data.Dataset.range(2))
    step = tf.function(lambda it: next(it))
    while True:  # until the iterator's end raises
        step(batches)


def write_table(path: Path, rows: list[dict], columns: list[str] | None = None) -> Path:
    """Rows as a CSV, TSV or JSONL file, the format from the extension (as data.source=files reads)."""
    import csv
    import json

    columns = columns or list(rows[0])
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        return path
    with path.open("w", newline="") as f:
        writer = csv.writer(f, delimiter="\t" if path.suffix == ".tsv" else ",")
        writer.writerow(columns)
        writer.writerows([row.get(c, "") for c in columns] for row in rows)
    return path


def review_rows(n: int, labels: tuple = ("neg", "pos"), seed: int = 0) -> list[dict]:
    """`n` separable reviews as table rows {"text", "label"}, cycling through `labels` (the
    first two: negative, positive)."""
    rng = random.Random(seed)
    return [{"text": make_review(rng, i % 2), "label": labels[i % len(labels)]} for i in range(n)]


def files_overrides(train: Path, out: Path, *extra: str) -> list[str]:
    """tiny_overrides with data.source=files on `train` in place of the folder, one epoch, and a
    quarter of the rows left after test (a fifth) held out for validation."""
    keep = [o for o in tiny_overrides(Path("unused"), out) if not o.startswith("data.")]
    return keep + ["data.source=files", f"data.train_files={train}", "data.validation_fraction=0.25",
                   "data.test_fraction=0.2", "train.epochs=1", *extra]
