import socket
import time

import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

import pipeline.data
import pipeline.data_tfds
from pipeline.config import DataConfig, load_config
from pipeline.data import DataError, check_nonempty, data_identity, load_raw
from pipeline.data_tfds import tfds_data_dir, unreachable
from tests.helpers import tiny_tfds

REFUSED = "http://127.0.0.1:1/aclImdb_v1.tar.gz"  # nothing listens on port 1: refused at once


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
    monkeypatch.setattr(pipeline.data_tfds, "unreachable", lambda url: probed.append(url))
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


def test_tfds_identity_comes_from_the_builder_info_without_a_download(monkeypatch):
    import tensorflow_datasets as tfds

    class Split:
        def __init__(self, n):
            self.num_examples = n

    class Info:
        full_name, version = "imdb_reviews/plain_text/1.0.0", "1.0.0"
        splits = {"train": Split(25000), "test": Split(25000)}

    calls = []

    def builder(name, data_dir=None, **kwargs):
        calls.append((name, data_dir, kwargs))
        return type("Builder", (), {"info": Info})()

    monkeypatch.setattr(tfds, "builder", builder)
    cfg = load_config(None, ["data.data_dir=/somewhere"]).data
    assert data_identity(cfg) == {"source": "tfds", "name": "imdb_reviews/plain_text/1.0.0",
                                  "version": "1.0.0", "splits": {"test": 25000, "train": 25000}}
    assert calls == [("imdb_reviews", "/somewhere", {})]  # no download_and_prepare, no options

    def broken(*args, **kwargs):
        raise FileNotFoundError("no dataset_info.json")

    monkeypatch.setattr(tfds, "builder", broken)
    with pytest.raises(DataError, match="imdb_reviews"):
        data_identity(cfg)
