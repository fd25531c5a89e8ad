import numpy as np
import tensorflow as tf

from pipeline.config import TrainConfig, VectorizeConfig
from pipeline.vectorize import (
    OOV,
    adapt_vectorizer,
    batch_ids,
    bucket_boundaries,
    load_vocabulary,
    make_vectorizer,
    prepare_ids,
    save_vocabulary,
    standardize,
    steps_per_epoch,
    texts_to_padded_ids,
    vectorize_cached,
    vectorize_split,
)


def _std(text: bytes | str) -> str:
    return standardize(tf.constant([text])).numpy()[0].decode()


def test_standardize_strips_html_breaks_and_punctuation():
    assert _std("Great film!<br /><br />Loved it.").split() == ["great", "film", "loved", "it"]
    assert _std("Don't<br/>STOP").split() == ["dont", "stop"]


def test_standardize_tolerates_invalid_utf8_and_keeps_unicode():
    assert "\ufffd" in _std(b"bad \xff\xfe bytes")
    assert _std("ÉTÉ 映画 😀").split()[:2] == ["été", "映画"]


def _raw(texts, labels):
    return tf.data.Dataset.from_tensor_slices((texts, tf.constant(labels, tf.int64)))


def test_adapt_and_vocabulary_round_trip(tmp_path):
    raw = _raw(["good good film", "bad film good"], [1, 0])
    vec = adapt_vectorizer(VectorizeConfig(max_tokens=10), raw)
    save_vocabulary(vec, tmp_path / "vocab.txt")
    rebuilt = make_vectorizer(VectorizeConfig(max_tokens=10), load_vocabulary(tmp_path / "vocab.txt"))
    assert rebuilt.get_vocabulary() == vec.get_vocabulary()
    assert vec.get_vocabulary() == ["", "[UNK]", "good", "film", "bad"]  # most frequent first


def test_empty_rows_get_one_oov_token_and_rows_are_truncated():
    ids = tf.ragged.constant([[], [5, 6, 7, 8], [9]], dtype=tf.int64)
    out = prepare_ids(ids, max_length=2).to_list()
    assert out == [[OOV], [5, 6], [9]]


def test_padding_is_to_the_batch_longest_not_max_length():
    vec = make_vectorizer(VectorizeConfig(), ["a", "b", "c"])
    ids = texts_to_padded_ids(vec, tf.constant(["a b", "c", "!!!"]), max_length=400)
    assert ids.shape == (3, 2)
    assert ids.numpy().tolist() == [[2, 3], [4, 0], [OOV, 0]]  # right padded; empty -> OOV


def test_vectorize_split_buckets_and_pads_right():
    texts = ["a " * n for n in range(1, 60)]
    raw = _raw(texts, [n % 2 for n in range(1, 60)])
    vec = make_vectorizer(VectorizeConfig(), ["a"])
    ds = vectorize_split(raw, vec, VectorizeConfig(max_length=50), TrainConfig(), batch_size=8)
    batches = list(ds.as_numpy_iterator())
    assert sum(len(y) for _, y in batches) == 59
    for ids, _ in batches:
        lengths = (ids != 0).sum(axis=1)
        assert ids.shape[1] == lengths.max() <= 50
        # Right padding: once a row hits 0 it stays 0.
        for row, n in zip(ids, lengths, strict=True):
            assert np.all(row[n:] == 0) and np.all(row[:n] != 0)
        # Bucketing: a batch never mixes very short and very long reviews.
        assert lengths.max() <= 1.5 * max(lengths.min(), 16) + 1


def test_bucket_boundaries_grow_and_stay_below_max_length():
    edges = bucket_boundaries(400)
    assert edges == sorted(edges) and edges[-1] < 400 and edges[0] == 16


def test_even_batches_trims_to_a_multiple_of_replicas():
    from pipeline.vectorize import even_batches

    ds = tf.data.Dataset.from_tensor_slices((tf.zeros([11, 4], tf.int64), tf.range(11))).batch(5)
    sizes = [len(y) for _, y in even_batches(ds, 2).as_numpy_iterator()]
    assert sizes == [4, 4]  # 5, 5, 1 -> 4, 4 and the lone example dropped


def test_steps_per_epoch_counts_the_batches_per_bucket():
    texts = ["a " * n for n in range(1, 120)] * 3
    raw = _raw(texts, [n % 2 for n in range(len(texts))])
    vcfg = VectorizeConfig(max_length=100)
    vec = make_vectorizer(vcfg, ["a"])
    for tcfg in (TrainConfig(), TrainConfig(bucket_by_length=False)):
        rows = vectorize_cached(raw, vec, vcfg)
        steps = steps_per_epoch(rows, vcfg, tcfg, batch_size=16)
        batches = list(batch_ids(rows, vcfg, tcfg, batch_size=16, shuffle_seed=3).as_numpy_iterator())
        assert steps == len(batches)
        assert sum(len(y) for _, y in batches) == len(texts)
        assert max(len(y) for _, y in batches) == 16
