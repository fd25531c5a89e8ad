import numpy as np
import pytest

from pipeline.config import load_config
from pipeline.data import DataError
from pipeline.pretrain import cache_path, embedding_matrix, read_vectors_file, train_word2vec
from tests.conftest import tiny_overrides


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
