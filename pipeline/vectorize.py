"""Text -> token ids: a `TextVectorization` adapted on training text only, applied in tf.data.

Sequences stay ragged until batching, so batches are padded to their own longest
review (and, with bucketing, reviews of similar length share a batch) instead of
every review being padded to `max_length`.
"""

from __future__ import annotations

import math
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from pipeline import atomic
from pipeline.config import TrainConfig, VectorizeConfig

PAD, OOV = 0, 1  # TextVectorization's reserved ids


def standardize(text: tf.Tensor) -> tf.Tensor:
    """Lowercase, drop IMDB's `<br />` breaks and punctuation; tolerate invalid UTF-8."""
    # Invalid bytes would make the regex ops fail at serving time; replace them instead.
    text = tf.strings.unicode_transcode(text, "UTF-8", "UTF-8", errors="replace")
    text = tf.strings.lower(text, encoding="utf-8")
    text = tf.strings.regex_replace(text, r"<br\s*/?>", " ")
    text = tf.strings.regex_replace(text, r"'", "")  # don't -> dont, one token
    return tf.strings.regex_replace(text, r"[[:punct:]]", " ")


def make_vectorizer(cfg: VectorizeConfig, vocabulary: list[str] | None = None
                    ) -> keras.layers.TextVectorization:
    """A ragged-output vectorizer; pass `vocabulary` to rebuild a saved one."""
    return keras.layers.TextVectorization(
        max_tokens=cfg.max_tokens,
        standardize=standardize,
        output_mode="int",
        ragged=True,
        vocabulary=vocabulary,
        name="vectorizer",
    )


def adapt_vectorizer(cfg: VectorizeConfig, raw_train: tf.data.Dataset
                     ) -> keras.layers.TextVectorization:
    """Build the vocabulary from training reviews only (validation and test never seen)."""
    vectorizer = make_vectorizer(cfg)
    texts = raw_train.map(lambda text, _: text).batch(cfg.adapt_batch_size)
    vectorizer.adapt(texts)
    return vectorizer


def prepare_ids(ids: tf.RaggedTensor, max_length: int) -> tf.RaggedTensor:
    """Truncate each row to `max_length` and give empty rows one OOV token.

    A review that vectorizes to nothing would be a fully masked row, which the
    cuDNN LSTM kernel rejects; one OOV token is the honest "unknown" input.
    """
    ids = ids[:, :max_length]
    empty = tf.equal(ids.row_lengths(), 0)
    n_empty = tf.reduce_sum(tf.cast(empty, tf.int64))
    filler = tf.RaggedTensor.from_row_lengths(
        tf.fill([n_empty], tf.constant(OOV, ids.dtype)), tf.cast(empty, tf.int64))
    return tf.concat([filler, ids], axis=1)


def texts_to_padded_ids(vectorizer: keras.layers.TextVectorization, texts: tf.Tensor,
                        max_length: int) -> tf.Tensor:
    """Raw strings [batch] -> right-padded int64 ids [batch, longest-in-batch]."""
    return prepare_ids(vectorizer(texts), max_length).to_tensor(default_value=PAD)


def save_vocabulary(vectorizer: keras.layers.TextVectorization, path: Path) -> None:
    # Ids 0 and 1 are implied by TextVectorization; store only real tokens, one per line.
    vocab = vectorizer.get_vocabulary(include_special_tokens=False)
    atomic.write_text(path, "".join(f"{token}\n" for token in vocab))


def load_vocabulary(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").split("\n")[:-1]


def bucket_boundaries(max_length: int) -> list[int]:
    """Length edges that grow ~1.5x, so padding wastes at most about a third of a batch."""
    edges, edge = [], 16
    while edge < max_length:
        edges.append(edge)
        edge = int(edge * 1.5)
    return edges


def buckets(vcfg: VectorizeConfig, tcfg: TrainConfig, batch_size: int) -> tuple[list[int], list[int]]:
    """The length edges `batch_ids` buckets by (none without bucketing) and each bucket's
    reviews per batch: `batch_size` in every one."""
    edges = bucket_boundaries(vcfg.max_length) if tcfg.bucket_by_length else []
    return edges, [batch_size] * (len(edges) + 1)


def steps_per_epoch(rows: tf.data.Dataset, vcfg: VectorizeConfig, tcfg: TrainConfig,
                    batch_size: int) -> int:
    """The batches `batch_ids` makes of the cached `rows` in one epoch, counted per bucket.

    The pass fills the rows' cache, which the epochs then read; it leaves the shuffle alone.
    """
    edges, sizes = buckets(vcfg, tcfg, batch_size)
    lengths = np.concatenate([np.zeros(0, np.int64)] + list(
        rows.map(lambda ids, *_: tf.shape(ids, out_type=tf.int64)[0]).batch(4096).as_numpy_iterator()))
    counts = np.bincount(np.searchsorted(edges, lengths, side="right"), minlength=len(sizes))
    return sum(math.ceil(count / size) for count, size in zip(counts, sizes, strict=True))


def vectorize_split(raw: tf.data.Dataset, vectorizer: keras.layers.TextVectorization,
                    vcfg: VectorizeConfig, tcfg: TrainConfig, batch_size: int,
                    shuffle_seed: int | None = None, replicas: int = 1) -> tf.data.Dataset:
    """(text, label) -> batches of (padded ids, label): vectorized once, cached, bucketed.

    `shuffle_seed` set means a training split: reshuffled each epoch after the cache.
    `replicas` > 1 trims each batch to a multiple of it (see `even_batches`).
    """
    return batch_ids(vectorize_cached(raw, vectorizer, vcfg), vcfg, tcfg, batch_size,
                     shuffle_seed=shuffle_seed, replicas=replicas)


def vectorize_cached(raw: tf.data.Dataset, vectorizer: keras.layers.TextVectorization,
                     vcfg: VectorizeConfig) -> tf.data.Dataset:
    """(text, label[, weight]) -> (ids, label[, weight]) rows, cached: tokenization happens on
    the first pass only. A sample weight (distillation's soft rows) travels with its row."""
    return (
        raw.batch(vcfg.adapt_batch_size)
        .map(lambda t, *rest: (prepare_ids(vectorizer(t), vcfg.max_length), *rest),
             num_parallel_calls=tf.data.AUTOTUNE)
        .unbatch()
        .map(lambda ids, *rest: (ids, *rest))  # unbatched rows are ragged-rank-0 specs; make them Tensors
        .cache()
    )


def batch_ids(ds: tf.data.Dataset, vcfg: VectorizeConfig, tcfg: TrainConfig, batch_size: int,
              shuffle_seed: int | None = None, replicas: int = 1) -> tf.data.Dataset:
    """Cached (ids, label) rows -> shuffled (if seeded), bucketed or padded, prefetched batches.

    Each call starts a new shuffle sequence over the same cache: tuning trials each
    call it to see the same batches in the same order.
    """
    if shuffle_seed is not None:
        ds = ds.shuffle(tcfg.shuffle_buffer, seed=shuffle_seed, reshuffle_each_iteration=True)
    edges, sizes = buckets(vcfg, tcfg, batch_size)
    if edges:
        ds = ds.bucket_by_sequence_length(
            element_length_func=lambda ids, *_: tf.shape(ids)[0],
            bucket_boundaries=edges,
            bucket_batch_sizes=sizes,
        )
    else:
        ds = ds.padded_batch(sizes[0])
    if replicas > 1:
        ds = even_batches(ds, replicas)
    return ds.prefetch(tf.data.AUTOTUNE)


def even_batches(ds: tf.data.Dataset, replicas: int) -> tf.data.Dataset:
    """Trim each batch to a multiple of `replicas`, dropping batches smaller than that.

    Keras under MirroredStrategy fails (AddN shape mismatch) when a masked batch
    splits unevenly across replicas. At most replicas-1 examples per bucket are
    skipped an epoch, and a different few each epoch since training data is reshuffled.
    """
    def trim(ids, *rest):
        n = tf.shape(ids)[0] // replicas * replicas
        return (ids[:n], *(t[:n] for t in rest))

    return ds.map(trim).filter(lambda ids, *_: tf.shape(ids)[0] > 0)
