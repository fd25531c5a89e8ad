import numpy as np
import pytest

import pipeline.data
from pipeline.config import DataConfig
from pipeline.data import DataError, check_nonempty, load_raw


def _texts(ds):
    return [t for t, _ in ds.as_numpy_iterator()]


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
    from pipeline.fingerprint import run_fingerprint
    from pipeline.pretrain import cache_path
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
