"""Shared fixtures: tiny generated data, a tiny config, trained runs reused by several tests.

Under pytest-xdist (`make test-all`, `make test-slow`: `-n 2 --dist loadgroup`) the tests that share
one of the expensive fixtures in SHARED_FIXTURES run in the same worker, one after the other in
file order, so each of those fixtures is built once per session, as in a plain `pytest` run.
"""

from __future__ import annotations

import os
import random
import signal
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.pop("TF_CONFIG", None)

import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

# Two logical CPUs so MirroredStrategy can be tested without GPUs; must precede TF's init.
_cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    _cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()])

from pipeline.config import Config, load_config  # noqa: E402

POSITIVE = "great wonderful excellent superb moving brilliant loved beautiful".split()
NEGATIVE = "awful terrible boring dull waste poor hated ugly".split()
NEUTRAL = "the movie film plot actor scene story was and it this a".split()


def ctrl_c_inside_tensorflow(monkeypatch: pytest.MonkeyPatch) -> None:
    """Send Ctrl-C while TensorFlow builds an OutOfRangeError, as at an epoch's end in CI.

    The interrupt is raised inside the exception's constructor, called from C++, and pybind11
    turns it into a RuntimeError: that is what reaches the caller, unless a handler raises
    something else first.
    """
    from tensorflow.python.framework import errors_impl

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


@pytest.fixture(scope="session")
def imdb_dir(tmp_path_factory) -> Path:
    return write_aclimdb(tmp_path_factory.mktemp("aclImdb"))


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


@pytest.fixture
def tiny_cfg(imdb_dir, tmp_path) -> Config:
    return load_config(None, tiny_overrides(imdb_dir, tmp_path))


# Resume tests (test_resume.py, test_runs.py): no early stop, so every epoch runs and an interruption
# always lands with epochs still to go; dropout, so the restored seed states matter.
RESUME_EPOCHS = 6
RESUME_EXTRA = [f"train.epochs={RESUME_EPOCHS}", f"train.early_stopping_patience={RESUME_EPOCHS}",
                "model.dropout=0.3"]


@pytest.fixture(scope="session")
def reference_run(imdb_dir, tmp_path_factory):
    """One uninterrupted tiny run with RESUME_EXTRA, not exported: what a resumed run must match
    exactly and a second run of the same config must equal."""
    from pipeline.train import train

    cfg = load_config(None, tiny_overrides(imdb_dir, tmp_path_factory.mktemp("reference")) + RESUME_EXTRA)
    return train(cfg, export=False)


@pytest.fixture(scope="session")
def trained_run(imdb_dir, tmp_path_factory):
    """One finished tiny run (trained and exported) with the n-gram branch, as the default
    config ships; shared by the export tests."""
    from pipeline.train import train

    out = tmp_path_factory.mktemp("trained")
    cfg = load_config(None, tiny_overrides(imdb_dir, out) + ["ngrams.enabled=true"])
    return cfg, train(cfg)


@pytest.fixture(scope="session")
def files_run(tmp_path_factory):
    """One finished tiny run (trained and exported) on a CSV whose labels are `bad` and `good`:
    the user's names must reach run.json, the metrics, the export and predict."""
    from pipeline.train import train

    out = tmp_path_factory.mktemp("files")
    table = write_table(out / "reviews.csv", review_rows(120, ("bad", "good")))
    cfg = load_config(None, files_overrides(table, out, "train.epochs=4"))
    return cfg, train(cfg)


# Fixtures that train (seconds each) and are shared by several tests, some in several files.
SHARED_FIXTURES = ("trained_run", "reference_run", "searched", "trained_lm", "three_epoch_backup",
                   "files_run")


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the xdist_group marks
def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist, one group per shared fixture: its tests go to one worker together."""
    if not config.pluginmanager.hasplugin("xdist"):
        return
    for item in items:
        shared = [name for name in SHARED_FIXTURES if name in item.fixturenames]
        if shared:
            item.add_marker(pytest.mark.xdist_group(shared[0]))
