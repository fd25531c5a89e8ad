import pytest

from pipeline.config import DataConfig
from pipeline.data import DataError, check_nonempty, load_raw
from tests.helpers import damage, tiny_tfds


def test_directory_caps(imdb_dir):
    cfg = DataConfig(source="directory", directory=str(imdb_dir), max_train_examples=7,
                     max_eval_examples=5)
    assert check_nonempty(load_raw(cfg, seed=0)) == {"train": 7, "validation": 5, "test": 5}


def test_empty_split_is_named(imdb_dir, tmp_path):
    for split in ("train", "test"):
        for cls in ("pos", "neg"):
            (tmp_path / split / cls).mkdir(parents=True)
    (tmp_path / "train" / "pos" / "0_9.txt").write_text("fine")
    (tmp_path / "test" / "neg" / "0_1.txt").write_text("bad")
    splits = load_raw(DataConfig(source="directory", directory=str(tmp_path)), seed=0)
    with pytest.raises(DataError, match="validation split is empty"):
        check_nonempty(splits)


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
