import logging

import numpy as np
import pytest

from pipeline.config import load_config
from pipeline.data import DataError
from pipeline.errors import ConfigError
from pipeline.pretrain import (
    Corpus,
    cache_path,
    embedding_matrix,
    read_vectors_file,
    train_word2vec,
    word2vec_for_size,
)
from tests.helpers import tiny_overrides, write_aclimdb


def test_read_glove_and_word2vec_text_formats(tmp_path):
    glove = tmp_path / "glove.txt"
    glove.write_text("good 0.1 0.2\nbad -0.1 -0.2\n")
    w2v = tmp_path / "w2v.txt"
    w2v.write_text("2 2\ngood 0.1 0.2\nbad -0.1 -0.2\n")
    for path in (glove, w2v):
        vectors = read_vectors_file(path)
        assert set(vectors) == {"good", "bad"}
        np.testing.assert_allclose(vectors["bad"], [-0.1, -0.2])


def test_ragged_vectors_file_is_refused(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("good 0.1 0.2\nbad 0.3\n")
    with pytest.raises(DataError, match="bad.txt:2"):
        read_vectors_file(bad)


def test_missing_vectors_file_is_a_one_line_data_error(tmp_path):
    with pytest.raises(DataError, match="embedding_file .*nope.txt.* does not exist"):
        read_vectors_file(tmp_path / "nope.txt")


def test_file_vectors_map_onto_the_vocabulary(imdb_dir, tmp_path):
    vec = tmp_path / "v.txt"
    vec.write_text("great 1 1 1 1 1 1 1 1\nawful -1 -1 -1 -1 -1 -1 -1 -1\n")
    cfg = load_config(None, tiny_overrides(imdb_dir, tmp_path) + [
        "model.embedding_init=file", f"model.embedding_file={vec}"])
    vocab = ["", "[UNK]", "great", "film", "awful"]
    m = embedding_matrix(cfg, vocab)
    assert m.shape == (5, 8)
    np.testing.assert_array_equal(m[0], 0)
    np.testing.assert_array_equal(m[2], 1)
    np.testing.assert_array_equal(m[4], -1)
    assert np.any(m[3] != 0)  # unknown words get small random vectors, not zeros


def test_dimension_mismatch_names_the_key(imdb_dir, tmp_path):
    vec = tmp_path / "v.txt"
    vec.write_text("great 1 1\n")
    cfg = load_config(None, tiny_overrides(imdb_dir, tmp_path) + [
        "model.embedding_init=file", f"model.embedding_file={vec}"])
    with pytest.raises(ValueError, match="model.embedding_dim"):
        embedding_matrix(cfg, ["", "[UNK]", "great"])


def test_word2vec_trains_once_and_is_cached(imdb_dir, tmp_path):
    cfg = load_config(None, tiny_overrides(imdb_dir, tmp_path) + [
        f"pretrain.directory={tmp_path / 'pre'}", "pretrain.min_count=1", "pretrain.epochs=2",
        "model.embedding_init=word2vec"])
    path = train_word2vec(cfg)
    assert path == cache_path(cfg) and path.is_file()
    stamp = path.stat().st_mtime_ns
    assert train_word2vec(cfg).stat().st_mtime_ns == stamp  # reused, not retrained
    m = embedding_matrix(cfg, ["", "[UNK]", "great", "awful", "zzzunseen"])
    assert m.shape == (5, 8) and np.all(np.isfinite(m))
    other = load_config(None, tiny_overrides(imdb_dir, tmp_path) + [
        f"pretrain.directory={tmp_path / 'pre'}", "pretrain.epochs=3"])
    assert cache_path(other) != path  # different settings, different vectors
    fetched = cfg.model_copy(update={"data": cfg.data.model_copy(update={"download": "never"})})
    assert cache_path(fetched) == path  # how the data arrived is not what it is


def _w2v_cfg(imdb_dir, tmp_path, *extra):
    return load_config(None, tiny_overrides(imdb_dir, tmp_path) + [
        f"pretrain.directory={tmp_path / 'pre'}", "pretrain.min_count=1", "pretrain.epochs=1",
        "model.embedding_init=word2vec", *extra])


def test_each_smaller_size_reduces_one_word2vec_run_once(imdb_dir, tmp_path):
    from gensim.models import KeyedVectors

    cfg = _w2v_cfg(imdb_dir, tmp_path, "pretrain.vector_size=8")
    small = word2vec_for_size(cfg, 4)
    assert small != cache_path(cfg) and cache_path(cfg).is_file()  # trained once, at 8-d
    kv = KeyedVectors.load(str(small))
    assert kv.vector_size == 4 and len(kv) == len(KeyedVectors.load(str(cache_path(cfg))))
    stamps = (small.stat().st_mtime_ns, cache_path(cfg).stat().st_mtime_ns)
    assert word2vec_for_size(cfg, 4) == small  # cached: neither rebuilt
    assert (small.stat().st_mtime_ns, cache_path(cfg).stat().st_mtime_ns) == stamps
    assert word2vec_for_size(cfg, 8) == cache_path(cfg)
    with pytest.raises(ConfigError, match="pretrain.vector_size"):
        word2vec_for_size(cfg, 16)
    # A model of the smaller size starts from the reduced vectors.
    four = cfg.model_copy(update={"model": cfg.model.model_copy(update={"embedding_dim": 4})})
    m = embedding_matrix(four, ["", "[UNK]", "great"])
    np.testing.assert_allclose(m[2], kv["great"])


def test_word2vec_corpus_is_unlabelled_and_training_text_only(imdb_dir, tmp_path):
    from pipeline import data as data_mod

    cfg = _w2v_cfg(imdb_dir, tmp_path)
    corpus = set(Corpus(cfg).texts.as_numpy_iterator())
    raw = data_mod.load_raw(cfg.data, cfg.seed)
    train = {t for t, _ in raw.train.as_numpy_iterator()}
    held = {t for t, _ in raw.validation.as_numpy_iterator()} | {t for t, _ in raw.test.as_numpy_iterator()}
    assert corpus == train and not corpus & held


def test_word2vec_says_when_the_unlabelled_reviews_are_missing(imdb_dir, tmp_path, caplog):
    cfg = load_config(None, tiny_overrides(imdb_dir, tmp_path))
    with caplog.at_level(logging.WARNING, logger="pipeline.pretrain"):
        corpus = Corpus(cfg)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"word2vec: no unlabelled reviews in {imdb_dir / 'train' / 'unsup'}; "
                        "training on the labelled training reviews only"]
    assert sum(1 for _ in corpus) == 90  # the training split alone (120 minus a quarter)


def test_word2vec_reads_the_unlabelled_reviews_without_a_warning(tmp_path, caplog):
    imdb = write_aclimdb(tmp_path / "aclImdb")
    unsup = imdb / "train" / "unsup"
    unsup.mkdir()
    for i in range(5):
        (unsup / f"{i}_0.txt").write_text("an unlabelled review of a film")
    cfg = load_config(None, tiny_overrides(imdb, tmp_path))
    with caplog.at_level(logging.WARNING, logger="pipeline.pretrain"):
        corpus = Corpus(cfg)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert sum(1 for _ in corpus) == 95


def test_word2vec_reads_the_unlabelled_files_and_the_training_rows(tmp_path, caplog):
    from tests.helpers import files_overrides, review_rows, write_table

    train = write_table(tmp_path / "train.csv", review_rows(40))
    unlabelled = write_table(tmp_path / "more.jsonl", [{"text": f"an unlabelled text {i}"} for i in range(5)]
                             + [{"text": ""}])
    cfg = load_config(None, files_overrides(train, tmp_path, f"data.unlabelled_files={unlabelled}"))
    with caplog.at_level(logging.WARNING, logger="pipeline.pretrain"):
        corpus = Corpus(cfg)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert sum(1 for _ in corpus) == 5 + 24  # the non-empty unlabelled rows, then train (40 - 8 - 8)


def test_the_same_seed_gives_the_same_vectors_bit_for_bit(imdb_dir, tmp_path):
    from gensim.models import KeyedVectors

    first = _w2v_cfg(imdb_dir, tmp_path / "a", "pretrain.epochs=2")
    second = _w2v_cfg(imdb_dir, tmp_path / "b", "pretrain.epochs=2")
    assert first.pretrain.workers == 1  # the default, because more threads are not repeatable
    a, b = (KeyedVectors.load(str(train_word2vec(c))) for c in (first, second))
    assert a.index_to_key == b.index_to_key
    np.testing.assert_array_equal(a.vectors, b.vectors)


def test_pretrain_seed_pins_the_vectors_whatever_the_run_seed(imdb_dir, tmp_path):
    base = _w2v_cfg(imdb_dir, tmp_path, "seed=1")
    assert cache_path(_w2v_cfg(imdb_dir, tmp_path, "seed=2")) != cache_path(base)
    pinned = [_w2v_cfg(imdb_dir, tmp_path, f"seed={s}", "pretrain.seed=1") for s in (1, 2)]
    assert cache_path(pinned[0]) == cache_path(pinned[1]) == cache_path(base)


def test_word2vec_logs_each_pass(imdb_dir, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="pipeline.pretrain"):
        train_word2vec(_w2v_cfg(imdb_dir, tmp_path, "pretrain.epochs=3"))
    passes = [r.getMessage() for r in caplog.records if r.getMessage().startswith("word2vec: pass")]
    assert [m.split(" (")[0] for m in passes] == [f"word2vec: pass {k} of 3 done" for k in (1, 2, 3)]
