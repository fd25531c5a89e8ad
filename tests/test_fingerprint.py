import shutil

import pytest

from pipeline import fingerprint as fingerprint_mod
from pipeline.config import load_config
from pipeline.data import data_identity
from pipeline.fingerprint import fingerprint, run_fingerprint
from tests.helpers import tiny_overrides


def fp_of(cfg) -> str:
    """The fingerprint of the run `cfg` would start: its keys and its data's identity."""
    return run_fingerprint(cfg, data_identity(cfg.data))


def test_fingerprint_is_short_and_ignores_key_order():
    assert fingerprint({"a": 1, "b": [1, 2]}) == fingerprint({"b": [1, 2], "a": 1})
    assert fingerprint({"a": 1}) != fingerprint({"a": 2})
    assert len(fingerprint({})) == 10


@pytest.mark.parametrize("volatile", [
    "runs_dir=elsewhere", "export.dir=elsewhere", "train.verbose=2", "tune.keep=4",
    "tune.directory=elsewhere", "pretrain.workers=7", "pretrain.directory=elsewhere",
    "model.tuned_hparams=latest",
])
def test_run_fingerprint_ignores_what_does_not_shape_the_weights(imdb_dir, tmp_path, volatile):
    base = load_config(None, tiny_overrides(imdb_dir, tmp_path))
    assert fp_of(load_config(None, tiny_overrides(imdb_dir, tmp_path) + [volatile])) == fp_of(base)


@pytest.mark.parametrize("change", ["model.lstm_units=9", "seed=1", "train.batch_size=8",
                                    "data.max_train_examples=50", "vectorize.max_tokens=99",
                                    "data.labels=[pos, neg]", "data.train_split=validation"])
def test_run_fingerprint_covers_what_shapes_the_weights(imdb_dir, tmp_path, change):
    base = load_config(None, tiny_overrides(imdb_dir, tmp_path))
    assert fp_of(load_config(None, tiny_overrides(imdb_dir, tmp_path) + [change])) != fp_of(base)


def test_run_fingerprint_follows_the_data_not_its_path(imdb_dir, tmp_path):
    cfg = load_config(None, tiny_overrides(imdb_dir, tmp_path))
    moved = shutil.copytree(imdb_dir, tmp_path / "moved")
    cfg_moved = load_config(None, tiny_overrides(moved, tmp_path))
    assert fp_of(cfg_moved) == fp_of(cfg)  # same reviews elsewhere: the same run
    review = next((moved / "train" / "pos").glob("*.txt"))
    review.write_text(review.read_text() + " more")
    assert fp_of(cfg_moved) != fp_of(cfg)  # other data: another run


def test_data_key_leaves_out_the_files_paths_and_keeps_every_other_key():
    from pipeline.config import DataConfig
    from pipeline.fingerprint import FILES_KEYS, data_key

    dumped = DataConfig(source="files", train_files="a.csv", text_column="body").model_dump()
    assert set(data_key(dumped)) == set(dumped) - set(FILES_KEYS)
    assert data_key(dumped)["text_column"] == "body"


def test_every_hash_carries_the_fingerprint_version(monkeypatch):
    before = fingerprint_mod.fingerprint({"a": 1})
    monkeypatch.setattr(fingerprint_mod, "FINGERPRINT_VERSION", fingerprint_mod.FINGERPRINT_VERSION + 1)
    # A new version renames every run, cache and search, so none of the old meaning is reused.
    assert fingerprint_mod.fingerprint({"a": 1}) != before
