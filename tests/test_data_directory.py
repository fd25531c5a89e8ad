import pytest

from pipeline.config import DataConfig, load_config
from pipeline.data import DataError, check_nonempty, data_identity, load_raw
from tests.helpers import write_aclimdb


def _texts(ds):
    return [t for t, _ in ds.as_numpy_iterator()]


def test_directory_source_carves_validation_deterministically(imdb_dir):
    cfg = DataConfig(source="directory", directory=str(imdb_dir), validation_fraction=0.25)
    a, b = load_raw(cfg, seed=3), load_raw(cfg, seed=3)
    sizes = check_nonempty(a)
    assert sizes == {"train": 90, "validation": 30, "test": 40}
    assert _texts(a.validation) == _texts(b.validation)
    assert not set(_texts(a.train)) & set(_texts(a.validation))
    labels = [int(y) for _, y in a.train.as_numpy_iterator()]
    assert set(labels) == {0, 1}  # shuffled before carving, so both classes are in train


def test_directory_without_pos_neg(tmp_path):
    (tmp_path / "train" / "good").mkdir(parents=True)
    with pytest.raises(DataError, match="pos"):
        load_raw(DataConfig(source="directory", directory=str(tmp_path)), seed=0)


def test_missing_directory(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_raw(DataConfig(source="directory", directory=str(tmp_path / "nope")), seed=0)


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


def test_fresh_folder_data_identity_counts_every_review(tmp_path):
    root = write_aclimdb(tmp_path / "imdb", n_train=8, n_test=4)
    (root / "train" / "unsup").mkdir()
    (root / "train" / "unsup" / "0_0.txt").write_text("unlabelled")
    identity = data_identity(load_config(None, ["data.source=directory",
                                                f"data.directory={root}"]).data)
    assert identity["source"] == "directory" and identity["files"] == 8 + 4 + 1
