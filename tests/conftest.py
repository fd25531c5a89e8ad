"""Fixtures only: tiny generated data, a tiny config, trained runs reused by several tests.

The builders behind them are plain functions in tests/helpers.py, imported inside each
fixture: helpers imports TensorFlow, which must wait for `pytest_configure`. Under pytest-xdist
(every `make test*` tier: `-n 2 --dist loadgroup`) the tests that share an expensive fixture
run in the same worker, one after the other in file order, so that fixture is built once per
session, as in a plain `pytest` run: a session fixture says it is expensive with `@shared`,
and a module-scoped fixture is taken to be (see `pytest_collection_modifyitems`).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from pipeline.config import Config, load_config


def shared(fixture_function):
    """For a session fixture that trains (seconds) and that several tests share, often in several
    files: under pytest-xdist its tests run in one worker, so it is built once. Goes under
    `@pytest.fixture`."""
    fixture_function.shared_by_tests = True
    return fixture_function


def pytest_configure(config):
    """Before any test module imports TensorFlow: its C++ start-up lines off, no cluster
    from the environment, and two logical CPUs so MirroredStrategy can be tested without GPUs
    (they must be set before TensorFlow initializes its devices)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.pop("TF_CONFIG", None)
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()])


@pytest.fixture
def default_sigint():
    """SIGINT raises KeyboardInterrupt in this process while the test runs, as under a terminal.

    A test run started in the background or under nohup inherits an ignored SIGINT (POSIX);
    a test that sends itself SIGINT would then see nothing happen.
    """
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.fixture(scope="session")
def imdb_dir(tmp_path_factory) -> Path:
    from tests.helpers import write_aclimdb

    return write_aclimdb(tmp_path_factory.mktemp("aclImdb"))


@pytest.fixture
def tiny_cfg(imdb_dir, tmp_path) -> Config:
    from tests.helpers import tiny_overrides

    return load_config(None, tiny_overrides(imdb_dir, tmp_path))


@pytest.fixture(scope="session")
@shared
def reference_run(imdb_dir, tmp_path_factory):
    """One uninterrupted tiny run with RESUME_EXTRA, not exported: what a resumed run must match
    exactly and a second run of the same config must equal."""
    from pipeline.train import train
    from tests.helpers import RESUME_EXTRA, tiny_overrides

    cfg = load_config(None, tiny_overrides(imdb_dir, tmp_path_factory.mktemp("reference")) + RESUME_EXTRA)
    return train(cfg, export=False)


@pytest.fixture(scope="session")
@shared
def trained_run(imdb_dir, tmp_path_factory):
    """One finished tiny run (trained and exported) with the n-gram branch, as the default
    config ships; shared by the export tests."""
    from pipeline.train import train
    from tests.helpers import tiny_overrides

    out = tmp_path_factory.mktemp("trained")
    cfg = load_config(None, tiny_overrides(imdb_dir, out) + ["ngrams.enabled=true"])
    return cfg, train(cfg)


@pytest.fixture(scope="session")
@shared
def files_run(tmp_path_factory):
    """One finished tiny run (trained and exported) on a CSV whose labels are `bad` and `good`:
    the user's names must reach run.json, the metrics, the export and predict."""
    from pipeline.train import train
    from tests.helpers import files_overrides, review_rows, write_table

    out = tmp_path_factory.mktemp("files")
    table = write_table(out / "reviews.csv", review_rows(120, ("bad", "good")))
    cfg = load_config(None, files_overrides(table, out, "train.epochs=4"))
    return cfg, train(cfg)


@pytest.fixture(scope="session")
def worse_model(trained_run):
    """trained_run's config, vectorizer and model with every weight zeroed and no n-gram branch:
    it calls every review positive at p = 0.5, so it is right on half the balanced tiny test split."""
    import numpy as np

    from pipeline.run_files import load_run

    _, result = trained_run
    cfg, vectorizer, model, _ = load_run(result.run_dir)
    model.set_weights([np.zeros_like(w) for w in model.get_weights()])
    return cfg, vectorizer, model


@pytest.fixture(scope="session")
def worse_export(worse_model, tmp_path_factory) -> Path:
    """worse_model exported as version 1 of its own folder (not published beside trained_run's)."""
    from pipeline.export import serving_archive, write_label_names

    cfg, vectorizer, model = worse_model
    path = tmp_path_factory.mktemp("worse") / "tiny" / "1"
    serving_archive(vectorizer, model, cfg).write_out(str(path), verbose=False)
    write_label_names(path, ("neg", "pos"))
    return path


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the xdist_group marks
def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist, one group per expensive fixture: its tests go to one worker together.

    A test joins the group of the first `@shared` session fixture it uses, directly or through
    another fixture; failing that, of the first module-scoped fixture it uses (one that trains,
    or writes a data set, for the tests of its file: split over workers, each would build it).
    """
    if not config.pluginmanager.hasplugin("xdist"):
        return
    for item in items:
        group = expensive_fixture(item)
        if group:
            item.add_marker(pytest.mark.xdist_group(group))


def expensive_fixture(item: pytest.Item) -> str | None:
    """The group `item` joins: the name of its first `@shared` session fixture, else
    `<file>::<name>` of its first module-scoped one, else None."""
    # pytest's resolved fixture definitions for the item (fixturenames is their closure)
    definitions = [item._fixtureinfo.name2fixturedefs[name][-1] for name in item.fixturenames
                   if name in item._fixtureinfo.name2fixturedefs]
    for fixture in definitions:
        if fixture.scope == "session" and getattr(fixture.func, "shared_by_tests", False):
            return fixture.argname
    for fixture in definitions:
        if fixture.scope == "module":
            return f"{fixture.baseid}::{fixture.argname}"
    return None
