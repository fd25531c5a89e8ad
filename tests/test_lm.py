import random

import numpy as np
import pytest

from pipeline import data as data_mod
from pipeline import lm as lm_mod
from pipeline.config import load_config
from pipeline.errors import ConfigError
from pipeline.model import LayerwiseAdam, PretrainedSchedule, build_model
from pipeline.pretrain import initial_weights
from tests.helpers import make_review, tiny_overrides, write_aclimdb


@pytest.fixture(scope="module")
def imdb_with_unsup(tmp_path_factory):
    root = write_aclimdb(tmp_path_factory.mktemp("aclImdb_unsup"))
    rng = random.Random(1)
    unsup = root / "train" / "unsup"
    unsup.mkdir()
    for i in range(150):
        (unsup / f"{i}_0.txt").write_text(make_review(rng, i % 2))
    return root


def lm_cfg(imdb, tmp_path, *extra):
    return load_config(None, tiny_overrides(imdb, tmp_path) + [
        f"pretrain.directory={tmp_path / 'pre'}", "model.embedding_init=lm",
        "pretrain.lm_epochs=3", "pretrain.lm_sequence_length=8", "pretrain.lm_batch_size=16",
        "pretrain.lm_sampled_softmax=20", "pretrain.lm_learning_rate=0.02",
        "pretrain.lm_dropout=0.0", *extra])


@pytest.fixture(scope="module")
def trained_lm(imdb_with_unsup, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lm")
    cfg = lm_cfg(imdb_with_unsup, tmp)
    return cfg, lm_mod.train_lm(cfg)


def test_language_models_learn(trained_lm):
    cfg, path = trained_lm
    weights, meta = lm_mod.load_lm(path)
    history = meta["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    for direction in ("forward", "backward"):
        first, last = history[0][f"val_perplexity_{direction}"], history[-1][f"val_perplexity_{direction}"]
        assert last < first  # the held-out perplexity falls as they train
    assert weights.embedding.shape == (len(weights.vocabulary), cfg.model.embedding_dim)
    assert weights.forward[1].shape == (cfg.model.lstm_units, 4 * cfg.model.lstm_units)
    assert not np.allclose(weights.forward[0], weights.backward[0])  # two models, not one


def test_cached_and_keyed_by_settings(trained_lm, imdb_with_unsup, tmp_path):
    cfg, path = trained_lm
    stamp = path.stat().st_mtime_ns
    assert lm_mod.train_lm(cfg) == path and path.stat().st_mtime_ns == stamp  # reused
    assert not path.with_name(path.name + ".partial.npz").exists()
    other = cfg.model_copy(update={"pretrain": cfg.pretrain.model_copy(update={"lm_epochs": 4})})
    assert lm_mod.cache_path(other) != path
    moved = cfg.model_copy(update={"pretrain": cfg.pretrain.model_copy(update={"lm_dropout": 0.5})})
    assert lm_mod.cache_path(moved) != path
    # How the data arrived is not what it is: the same models serve any download setting.
    fetched = cfg.model_copy(update={"data": cfg.data.model_copy(update={"download": "never"})})
    assert lm_mod.cache_path(fetched) == path


def test_classifier_starts_from_the_language_models(trained_lm):
    cfg, path = trained_lm
    weights, _ = lm_mod.load_lm(path)
    vocabulary = list(reversed(weights.vocabulary[2:])) + ["zzzunseen"]  # another order, one new word
    vocabulary = ["", "[UNK]"] + vocabulary
    init = initial_weights(cfg, vocabulary)
    model = build_model(len(vocabulary), embedding_dim=cfg.model.embedding_dim,
                        lstm_units=cfg.model.lstm_units, bidirectional=True, pooling="concat", **init)
    emb = model.get_layer("embedding").get_weights()[0]
    index = {w: i for i, w in enumerate(weights.vocabulary)}
    for i, word in enumerate(vocabulary[1:-1], start=1):
        np.testing.assert_array_equal(emb[i], weights.embedding[index[word]])
    np.testing.assert_array_equal(emb[0], 0.0)
    bilstm = model.get_layer("bilstm_0")
    for got, want in ((bilstm.forward_layer, weights.forward), (bilstm.backward_layer, weights.backward)):
        for a, b in zip(got.get_weights(), want, strict=True):
            np.testing.assert_array_equal(a, b)
    assert model.optimizer.pretrained == ("embedding", "bilstm_0")


def test_pretraining_never_reads_validation_or_test_text(imdb_with_unsup, tmp_path, monkeypatch):
    cfg = lm_cfg(imdb_with_unsup, tmp_path, "pretrain.lm_epochs=1")
    seen: list[bytes] = []
    real = lm_mod.corpus_ids

    def spy(texts, vectorizer, batch_size=1024):
        seen.extend(t for t in texts.as_numpy_iterator())
        return real(texts, vectorizer, batch_size)

    monkeypatch.setattr(lm_mod, "corpus_ids", spy)
    lm_mod.train_lm(cfg)
    raw = data_mod.load_raw(cfg.data, cfg.seed)
    held = {t for t, _ in raw.validation.as_numpy_iterator()} | {t for t, _ in raw.test.as_numpy_iterator()}
    train = {t for t, _ in raw.train.as_numpy_iterator()}
    assert train <= set(seen)  # the training reviews are in the corpus ...
    assert not held & (set(seen) - train)  # ... and no validation or test review is


@pytest.mark.slow
def test_killed_pretraining_resumes_after_its_last_epoch(imdb_with_unsup, tmp_path, monkeypatch):
    cfg = lm_cfg(imdb_with_unsup, tmp_path, "pretrain.lm_epochs=2")
    real, calls = lm_mod.perplexity, []

    def dies_in_epoch_two(lm, windows, batch_size=32):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(lm, windows, batch_size)

    monkeypatch.setattr(lm_mod, "perplexity", dies_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        lm_mod.train_lm(cfg)
    assert lm_mod.cache_path(cfg).with_name(lm_mod.cache_path(cfg).name + ".partial.npz").is_file()
    monkeypatch.setattr(lm_mod, "perplexity", real)
    _, meta = lm_mod.load_lm(lm_mod.train_lm(cfg))
    assert [h["epoch"] for h in meta["history"]] == [1, 2]


def test_lm_init_needs_one_layer(imdb_dir, tmp_path):
    with pytest.raises(ConfigError, match="model.num_layers"):
        load_config(None, tiny_overrides(imdb_dir, tmp_path) + ["model.embedding_init=lm",
                                                                 "model.num_layers=2"])


def test_frozen_pretrained_layers_do_not_move_while_the_head_learns():
    rng = np.random.default_rng(0)
    x = rng.integers(2, 30, size=(16, 6))
    y = (x[:, 0] > 15).astype("float32")
    matrix = rng.normal(size=(30, 4)).astype("float32")
    lstm = [rng.normal(size=s).astype("float32") * 0.1 for s in ((4, 12), (3, 12), (12,))]
    model = build_model(30, embedding_dim=4, lstm_units=3, pooling="max", embedding_matrix=matrix,
                        lstm_weights=(lstm, lstm), pretrained_lr_scale=0.5)
    assert isinstance(model.optimizer, LayerwiseAdam)
    schedule = PretrainedSchedule(freeze_epochs=1, scale=0.5)
    schedule.set_model(model)
    schedule.on_epoch_begin(0)
    frozen = [w.copy() for w in model.get_layer("embedding").get_weights()
              + model.get_layer("bilstm_0").get_weights()]
    head = model.get_layer("probability").get_weights()[0].copy()
    model.train_on_batch(x, y)
    after = model.get_layer("embedding").get_weights() + model.get_layer("bilstm_0").get_weights()
    for a, b in zip(frozen, after, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.allclose(head, model.get_layer("probability").get_weights()[0])
    schedule.on_epoch_begin(1)  # unfrozen: now they learn too, at half the rate
    assert float(model.optimizer.pretrained_scale.numpy()) == 0.5
    model.train_on_batch(x, y)
    assert not np.allclose(frozen[0], model.get_layer("embedding").get_weights()[0])
