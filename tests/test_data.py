import socket
import time

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

import pipeline.data
from pipeline.config import DataConfig
from pipeline.data import DataError, check_nonempty, load_raw, tfds_data_dir, unreachable
from tests.helpers import damage, tiny_tfds, write_aclimdb

REFUSED = "http://127.0.0.1:1/aclImdb_v1.tar.gz"  # nothing listens on port 1: refused at once


def _texts(ds):
    return [t for t, _ in ds.as_numpy_iterator()]


def test_tfds_source_with_mock_data():
    with tfds.testing.mock_data(num_examples=24):
        splits = load_raw(DataConfig(max_train_examples=10, download="never"), seed=0)
        assert check_nonempty(splits)["train"] == 10
        text, label = next(iter(splits.train))
    assert text.dtype == tf.string and label.dtype == tf.int64


def test_tfds_missing_says_how_to_fix(tmp_path):
    with pytest.raises(DataError) as info:
        load_raw(DataConfig(data_dir=str(tmp_path), download="never"), seed=0)
    message = str(info.value)
    assert message == (f"cannot load tfds dataset 'imdb_reviews' (no prepared copy in {tmp_path}/"
                       "imdb_reviews/plain_text/1.0.0): set TFDS_DATA_DIR (or data.data_dir) to a "
                       "prepared copy, the data dir of a machine with internet after `tfds build "
                       "imdb_reviews`; or use data.source=directory or files")
    # how a user makes a prepared copy, not where this checkout keeps one; short enough to read
    assert "shared" not in message and len(message) - len(str(tmp_path)) < 300


def test_a_misspelled_tfds_name_gets_the_nearest_names(tmp_path):
    with pytest.raises(DataError) as info:
        load_raw(DataConfig(tfds_name="imdb_review", data_dir=str(tmp_path), download="never"), seed=0)
    assert str(info.value) == "data.tfds_name: tensorflow-datasets has no dataset 'imdb_review'; did you " \
                              "mean 'imdb_reviews'?"
    with pytest.raises(DataError, match=r"^cannot load tfds dataset 'imdb_reviews' \(no prepared copy"):
        load_raw(DataConfig(data_dir=str(tmp_path), download="never"), seed=0)  # the name it suggests


def test_directory_source_carves_validation_deterministically(imdb_dir):
    cfg = DataConfig(source="directory", directory=str(imdb_dir), validation_fraction=0.25)
    a, b = load_raw(cfg, seed=3), load_raw(cfg, seed=3)
    sizes = check_nonempty(a)
    assert sizes == {"train": 90, "validation": 30, "test": 40}
    assert _texts(a.validation) == _texts(b.validation)
    assert not set(_texts(a.train)) & set(_texts(a.validation))
    labels = [int(y) for _, y in a.train.as_numpy_iterator()]
    assert set(labels) == {0, 1}  # shuffled before carving, so both classes are in train


def test_directory_caps(imdb_dir):
    cfg = DataConfig(source="directory", directory=str(imdb_dir), max_train_examples=7,
                     max_eval_examples=5)
    assert check_nonempty(load_raw(cfg, seed=0)) == {"train": 7, "validation": 5, "test": 5}


def test_directory_without_pos_neg(tmp_path):
    (tmp_path / "train" / "good").mkdir(parents=True)
    with pytest.raises(DataError, match="pos"):
        load_raw(DataConfig(source="directory", directory=str(tmp_path)), seed=0)


def test_missing_directory(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_raw(DataConfig(source="directory", directory=str(tmp_path / "nope")), seed=0)


def test_empty_split_is_named(imdb_dir, tmp_path):
    for split in ("train", "test"):
        for cls in ("pos", "neg"):
            (tmp_path / split / cls).mkdir(parents=True)
    (tmp_path / "train" / "pos" / "0_9.txt").write_text("fine")
    (tmp_path / "test" / "neg" / "0_1.txt").write_text("bad")
    splits = load_raw(DataConfig(source="directory", directory=str(tmp_path)), seed=0)
    with pytest.raises(DataError, match="validation split is empty"):
        check_nonempty(splits)


def test_class_folders_without_reviews(tmp_path):
    for split in ("train", "test"):
        for cls in ("pos", "neg"):
            (tmp_path / split / cls).mkdir(parents=True)
    with pytest.raises(DataError, match="no .txt files"):
        load_raw(DataConfig(source="directory", directory=str(tmp_path)), seed=0)


@pytest.mark.parametrize("kind", ["directory", "broken_link"])
def test_unreadable_review_file_is_named(tmp_path, kind):
    root = write_aclimdb(tmp_path / "imdb", n_train=8, n_test=4)
    bad = root / "train" / "pos" / "99_9.txt"
    if kind == "directory":
        bad.mkdir()
    else:
        bad.symlink_to(tmp_path / "gone.txt")
    with pytest.raises(DataError, match=r"cannot read review file .*99_9\.txt.*remove it or fix it"):
        load_raw(DataConfig(source="directory", directory=str(root)), seed=0)


class FakeInfo:
    supervised_keys = ("text", "label")
    features = {"text": tfds.features.Text(), "label": tfds.features.ClassLabel(names=["neg", "pos"])}


class FakeBuilder:
    info = FakeInfo()

    def __init__(self, prepared: bool, url: str = REFUSED):
        self._prepared, self.url_infos, self.data_dir = prepared, {url: None}, "/nowhere/imdb_reviews"

    def is_prepared(self) -> bool:
        return self._prepared


@pytest.fixture
def tfds_calls(monkeypatch):
    """Record how tfds.load is called, with a builder that says whether a copy is prepared."""
    calls, state = [], {"prepared": True}

    def load(name, split, **kwargs):
        calls.append(kwargs["download"])
        return [tf.data.Dataset.from_tensor_slices((["a review"], [1]))] * len(split)

    monkeypatch.setattr(tfds, "load", load)
    monkeypatch.setattr(tfds, "builder", lambda name, data_dir=None: FakeBuilder(state["prepared"]))
    return calls, state


@pytest.mark.parametrize("mode,prepared,download", [
    ("never", False, False),  # today's behaviour: a prepared copy or nothing
    ("auto", True, False),  # a prepared copy is used as it is
    ("always", False, True),  # tfds is left to download, no check first
    ("always", True, True),
])
def test_which_way_tfds_is_called(tfds_calls, mode, prepared, download):
    calls, state = tfds_calls
    state["prepared"] = prepared
    load_raw(DataConfig(download=mode), seed=0)
    assert calls == [download]


def test_auto_downloads_when_no_copy_is_prepared_and_the_server_answers(tfds_calls, monkeypatch):
    calls, state = tfds_calls
    state["prepared"] = False
    probed = []
    monkeypatch.setattr(pipeline.data, "unreachable", lambda url: probed.append(url))
    load_raw(DataConfig(download="auto"), seed=0)
    assert calls == [True] and probed == [REFUSED]


def test_auto_offline_fails_in_seconds_with_the_hint(tfds_calls):
    calls, state = tfds_calls
    state["prepared"] = False
    t0 = time.monotonic()
    with pytest.raises(DataError) as info:
        load_raw(DataConfig(download="auto"), seed=0)
    assert time.monotonic() - t0 < 5
    message = str(info.value)
    assert "cannot be reached" in message and "TFDS_DATA_DIR" in message
    assert len(message.splitlines()) == 1
    assert calls == []  # tfds.load (and its minutes of retries) never ran


def test_unreachable_is_bounded_by_its_timeout():
    # A server that accepts connections but never answers: the probe gives up on time.
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        t0 = time.monotonic()
        why = unreachable(f"http://127.0.0.1:{server.getsockname()[1]}/x", timeout=1.0)
    assert why and time.monotonic() - t0 < 3
    assert unreachable(REFUSED, timeout=5.0)  # refused: a reason, at once


def test_tfds_data_dir_order(monkeypatch):
    monkeypatch.setenv("TFDS_DATA_DIR", "/from/env")
    assert tfds_data_dir(DataConfig(data_dir="/from/config")) == "/from/config"
    assert tfds_data_dir(DataConfig()) == "/from/env"
    monkeypatch.delenv("TFDS_DATA_DIR")
    assert tfds_data_dir(DataConfig()) is None  # tfds's own default


def test_prepared_tfds_copy_reads_whole(tmp_path):
    tiny_tfds(tmp_path)
    cfg = DataConfig(tfds_name="tiny_reviews", data_dir=str(tmp_path), download="auto",
                     validation_fraction=0.25)
    assert check_nonempty(load_raw(cfg, seed=0)) == {"train": 45, "validation": 15, "test": 20}


@pytest.mark.parametrize("how", ["truncated", "byte_flipped"])
def test_damaged_record_file_is_named_before_any_epoch(tmp_path, how):
    bad = tiny_tfds(tmp_path)
    damage(bad, how)
    splits = load_raw(DataConfig(tfds_name="tiny_reviews", data_dir=str(tmp_path), download="never"),
                      seed=0)
    with pytest.raises(DataError) as info:
        check_nonempty(splits)
    message = str(info.value)
    assert str(bad) in message and "damaged" in message and len(message.splitlines()) == 1


# --- data.source: files -------------------------------------------------------------------------


def _files_cfg(train, **kwargs) -> DataConfig:
    return DataConfig(source="files", train_files=str(train), validation_fraction=0.25,
                      test_fraction=0.2, **kwargs)


def test_files_source_carves_test_then_validation_deterministically(tmp_path):
    from tests.helpers import review_rows, write_table

    # Sorted by label, as exports often are: the carving must not take one class only.
    rows = sorted(review_rows(100, ("bad", "good")), key=lambda r: r["label"])
    cfg = _files_cfg(write_table(tmp_path / "r.csv", rows))
    a, b = load_raw(cfg, seed=1), load_raw(cfg, seed=1)
    assert a.labels == ("bad", "good")
    assert check_nonempty(a) == {"train": 60, "validation": 20, "test": 20}
    assert _texts(a.test) == _texts(b.test) and _texts(a.train) == _texts(b.train)
    assert _texts(a.train) != _texts(load_raw(cfg, seed=2).train)
    parts = [set(_texts(s)) for s in (a.train, a.validation, a.test)]
    assert not parts[0] & parts[1] and not parts[0] & parts[2] and not parts[1] & parts[2]
    for split in (a.train, a.validation, a.test):
        assert {int(y) for _, y in split.as_numpy_iterator()} == {0, 1}
    capped = load_raw(_files_cfg(cfg.train_files, max_train_examples=7, max_eval_examples=5), seed=1)
    assert check_nonempty(capped) == {"train": 7, "validation": 5, "test": 5}


def test_files_source_with_test_files_and_unlabelled_rows(tmp_path):
    from tests.helpers import review_rows, write_table

    train = write_table(tmp_path / "train.jsonl", review_rows(40, (0, 1)))  # JSON integers
    test = write_table(tmp_path / "test.tsv", review_rows(10, (0, 1), seed=1))
    unlabelled = write_table(tmp_path / "u.csv", [{"text": "more text"}, {"text": "and more"}])
    cfg = _files_cfg(train, test_files=str(test), unlabelled_files=str(unlabelled))
    splits = load_raw(cfg, seed=0)
    assert splits.labels == ("0", "1")
    assert check_nonempty(splits) == {"train": 30, "validation": 10, "test": 10}
    assert sorted(_texts(splits.test)) == sorted(r["text"].encode() for r in review_rows(10, seed=1))
    assert list(pipeline.data.unsupervised_texts(cfg).as_numpy_iterator()) == [b"more text", b"and more"]


def test_a_changed_file_is_other_data(tmp_path):
    from pipeline.config import Config
    from pipeline.pretrain import cache_path
    from pipeline.runs import run_fingerprint
    from tests.helpers import review_rows, write_table

    def keys(cfg):  # the run's fingerprint and its word2vec vectors' file
        return (run_fingerprint(Config(data=cfg), pipeline.data.data_identity(cfg)),
                cache_path(Config(data=cfg)))

    path = write_table(tmp_path / "r.csv", review_rows(20))
    cfg = _files_cfg(path)
    before = pipeline.data.data_identity(cfg)
    assert keys(cfg) == keys(cfg)
    moved = write_table(tmp_path / "moved.csv", review_rows(20))
    assert pipeline.data.data_identity(_files_cfg(moved)) == before  # what it is, not where
    fingerprint, vectors = keys(cfg)
    write_table(path, review_rows(20, seed=5))
    assert pipeline.data.data_identity(cfg) != before
    new_fingerprint, new_vectors = keys(cfg)
    assert new_fingerprint != fingerprint and new_vectors != vectors


def test_unlabelled_files_are_checked_with_the_training_data(tmp_path):
    from pipeline.tables import TableError
    from tests.helpers import review_rows, write_table

    train = write_table(tmp_path / "r.csv", review_rows(20))
    unlabelled = write_table(tmp_path / "u.csv", [{"body": "x"}])
    with pytest.raises(TableError, match=r"u.csv: no column 'text' \(columns found: 'body'\)"):
        load_raw(_files_cfg(train, unlabelled_files=str(unlabelled)), seed=0)


def test_tfds_source_with_other_keys_splits_and_class_names():
    # glue/sst2: the text is `sentence`, and test's labels are hidden, so validation scores.
    cfg = DataConfig(tfds_name="glue/sst2", text_key="sentence", test_split="validation",
                     download="never")
    with tfds.testing.mock_data(num_examples=12):
        splits = load_raw(cfg, seed=0)
        text, label = next(iter(splits.test))
        flipped = load_raw(cfg.model_copy(update={"labels": ["positive", "negative"]}), seed=0)
        flipped_label = next(iter(flipped.test))[1]
        assert pipeline.data.count(pipeline.data.unsupervised_texts(cfg)) == 0  # sst2 has none
    assert splits.labels == ("negative", "positive") and flipped.labels == ("positive", "negative")
    assert text.dtype == tf.string and label.dtype == tf.int64 and int(flipped_label) == 1 - int(label)
    with pytest.raises(DataError, match=r"no feature 'review' \(features: .*sentence.*set data.text_key"):
        load_raw(cfg.model_copy(update={"text_key": "review"}), seed=0)


def _labels_of(ds) -> list[int]:
    return [int(y) for _, y in ds.as_numpy_iterator()]


def test_tiny_files_put_both_classes_in_every_split(tmp_path, caplog):
    from tests.helpers import review_rows, write_table

    path = write_table(tmp_path / "r.csv", review_rows(6, ("bad", "good")))  # 3 of each
    with caplog.at_level("INFO", logger="pipeline"):
        splits = load_raw(_files_cfg(path), seed=0)
    for split in (splits.train, splits.validation, splits.test):
        assert sorted(_labels_of(split)) == [0, 1]
    assert ("data: 6 row(s) read, 0 skipped (none); labels 'bad' (0) and 'good' (1, positive); "
            "train bad 1 / good 1, validation bad 1 / good 1, test bad 1 / good 1") in caplog.text


@pytest.mark.parametrize("test_files,need", [(False, "train, validation, test: each class needs at least 3 "
                                                      "(or give data.test_files)"),
                                             (True, "train, validation: each class needs at least 2")])
def test_a_class_too_small_to_split_says_how_many_rows_it_needs(tmp_path, test_files, need):
    from tests.helpers import review_rows, write_table

    rows = review_rows(200, ("bad",)) + review_rows(2 - test_files, ("good",))
    path = write_table(tmp_path / "r.csv", rows)
    extra = {"test_files": str(write_table(tmp_path / "t.csv", review_rows(4, ("bad", "good"))))} \
        if test_files else {}
    with pytest.raises(DataError) as info:
        load_raw(_files_cfg(path, **extra), seed=0)
    assert str(info.value) == (f"data.train_files: the class 'good' has {2 - test_files} row(s), too few to "
                               f"put one in each of {need}")
    # the fix it names: one more row of that class
    write_table(path, rows + review_rows(1, ("good",)))
    splits = load_raw(_files_cfg(path, **extra), seed=0)
    assert sorted(set(_labels_of(splits.validation))) == [0, 1]


def test_imbalanced_files_keep_the_class_ratio_in_each_split(tmp_path):
    from tests.helpers import review_rows, write_table

    rows = review_rows(180, ("bad",)) + review_rows(20, ("good",), seed=1)  # sorted by label
    splits = load_raw(_files_cfg(write_table(tmp_path / "r.csv", rows)), seed=0)
    counts = [np.bincount(_labels_of(s), minlength=2).tolist()
              for s in (splits.train, splits.validation, splits.test)]
    assert counts == [[108, 12], [36, 4], [36, 4]]  # test 20% of each class, validation 25% of the rest
