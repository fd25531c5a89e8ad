"""The n-gram branch: a bag-of-n-grams logistic regression whose logit is blended with the LSTM's.

A BiLSTM and a linear model over word n-grams make different mistakes: the first reads
order and negation across a review, the second weighs every phrase of it at once. Their
logits, combined by a logistic regression fitted on the validation split (stacking, in
`pipeline.scoring`), beat either alone (docs/experiments/ngrams.md). The linear model is
NBSVM-style (Wang & Manning 2012):

    counts of 1..order-grams -> sublinear tf (1 + log count) x idf -> L2 norm -> x NB ratio

where the naive-Bayes log-count ratio r = log(p/|p|) - log(q/|q|) (p, q: smoothed document
counts in positive and negative training reviews) scales each n-gram by how much it
separates the classes before the regression weighs it. r is folded into the weights.

The features come from one TensorFlow function used for training, evaluation and
serving, on the tokens of the run's vectorizer (`pipeline.vectorize.standardize`), so
the SavedModel computes exactly what was trained. The vocabulary and idf see training
reviews only; the NB ratio and the regression see them and, with `ngrams.cotrain`, the
unlabelled reviews too, labelled by the trained BiLSTM (co-training: each view labels
unlabelled text for the other); never validation or test reviews.
"""

from __future__ import annotations

import functools
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from scipy import sparse

from pipeline.atomic import atomic_path
from pipeline.config import NgramsConfig
from pipeline.vectorize import standardize

log = logging.getLogger(__name__)

BATCH = 512  # reviews per TensorFlow call while counting or scoring


@dataclass(frozen=True)
class NgramModel:
    """A fitted branch and its blend with the LSTM: everything the run saves and the export needs."""

    vocabulary: list[str]  # n-grams; column i+1 of the counts (column 0 counts the unknown ones)
    idf: np.ndarray  # float32 [len(vocabulary)]
    weights: np.ndarray  # float32 [len(vocabulary)]: regression weights x NB ratio
    bias: float
    order: int
    blend: tuple[float, float, float] = (0.0, 1.0, 0.0)  # (LSTM logit, n-gram logit, intercept)

    @functools.cached_property
    def layer(self) -> NgramLogit:
        """The branch as a built layer, shared by scoring and export: its lookup table holds
        every n-gram, so building it once per model saves seconds on each use."""
        return ngram_layer(self)


def _grams(texts: tf.Tensor, order: int) -> tf.RaggedTensor:
    # The same steps as TextVectorization(standardize, split="whitespace", ngrams=order).
    return tf.strings.ngrams(tf.strings.split(standardize(texts)),
                             ngram_width=tuple(range(1, order + 1)), separator=" ")


def build_vocabulary(texts: list[str], cfg: NgramsConfig) -> tuple[list[str], np.ndarray]:
    """The n-grams in at least `min_df` of `texts` (most frequent first, at most
    `max_features`) and their smoothed idf, log((1 + n) / (1 + df)) + 1 as scikit-learn's."""
    df: Counter[bytes] = Counter()
    for start in range(0, len(texts), BATCH):
        for row in _grams(tf.constant(texts[start:start + BATCH]), cfg.order).to_list():
            df.update(set(row))
    kept = sorted(((g, c) for g, c in df.items() if c >= cfg.min_df), key=lambda gc: (-gc[1], gc[0]))
    kept = kept[:cfg.max_features]
    counts = np.array([c for _, c in kept], dtype=np.float64)
    idf = (np.log((1 + len(texts)) / (1 + counts)) + 1).astype(np.float32)
    return [g.decode("utf-8") for g, _ in kept], idf


@keras.saving.register_keras_serializable(package="pipeline")
class NgramLogit(keras.layers.Layer):
    """Raw review strings [batch] -> the n-gram regression's logit [batch]."""

    def __init__(self, vocabulary: list[str], order: int, **kwargs):
        # float32 whatever the global policy: a regression's weights, not a mixed-precision layer
        super().__init__(trainable=False, dtype="float32", **kwargs)
        self.order = order
        self.counter = keras.layers.TextVectorization(
            standardize=standardize, ngrams=order, output_mode="count", sparse=True,
            vocabulary=vocabulary, name="ngram_counts")
        n = len(vocabulary) + 1  # column 0: unknown n-grams, which get idf 0 and weight 0
        self.idf = self.add_weight(shape=(n,), initializer="zeros", trainable=False, name="idf")
        self.coef = self.add_weight(shape=(n,), initializer="zeros", trainable=False,
                                        name="weights")
        self.bias = self.add_weight(shape=(), initializer="zeros", trainable=False, name="bias")

    def set_values(self, idf: np.ndarray, weights: np.ndarray, bias: float) -> None:
        self.idf.assign(np.concatenate([[0.0], idf]).astype(np.float32))
        self.coef.assign(np.concatenate([[0.0], weights]).astype(np.float32))
        self.bias.assign(bias)

    def features(self, texts: tf.Tensor) -> tf.SparseTensor:
        """Sublinear tf x idf, L2-normalized per review: [batch, 1 + vocabulary]."""
        counts = self.counter(texts)
        rows, cols = counts.indices[:, 0], counts.indices[:, 1]
        values = (1.0 + tf.math.log(tf.cast(counts.values, tf.float32))) * tf.gather(self.idf, cols)
        n_rows = tf.shape(texts, out_type=tf.int64)[0]
        norms = tf.sqrt(tf.math.unsorted_segment_sum(tf.square(values), rows, n_rows))
        values = values / tf.gather(tf.maximum(norms, 1e-12), rows)
        return tf.SparseTensor(counts.indices, values, [n_rows, counts.dense_shape[1]])

    def call(self, texts):
        x = self.features(texts)
        rows, cols = x.indices[:, 0], x.indices[:, 1]
        terms = x.values * tf.gather(self.coef, cols)
        return tf.math.unsorted_segment_sum(terms, rows, x.dense_shape[0]) + self.bias


def ngram_layer(m: NgramModel) -> NgramLogit:
    """The fitted branch as a layer, built (one call), so an export can track it."""
    layer = NgramLogit(m.vocabulary, m.order, name="ngram_logit")
    layer.set_values(m.idf, m.weights, m.bias)
    layer(tf.constant([""]))
    return layer


def feature_matrix(layer: NgramLogit, texts: list[str]) -> sparse.csr_matrix:
    """The branch's features of `texts` as a SciPy matrix (column 0, unknown n-grams, dropped)."""
    features = tf.function(layer.features, input_signature=[tf.TensorSpec([None], tf.string)])
    parts = []
    for start in range(0, len(texts), BATCH):
        x = features(tf.constant(texts[start:start + BATCH]))
        idx = x.indices.numpy()
        parts.append(sparse.csr_matrix((x.values.numpy(), (idx[:, 0], idx[:, 1])),
                                       shape=tuple(x.dense_shape.numpy())))
    return sparse.vstack(parts).tocsr()[:, 1:]


def nb_ratio(x: sparse.csr_matrix, labels: np.ndarray, alpha: float = 1.0) -> np.ndarray:
    """log(p / |p|) - log(q / |q|) over binarized features: + for positive n-grams, - for negative."""
    present = (x > 0).astype(np.float64)
    p = alpha + np.asarray(present[labels == 1].sum(axis=0)).ravel()
    q = alpha + np.asarray(present[labels == 0].sum(axis=0)).ravel()
    return (np.log(p / p.sum()) - np.log(q / q.sum())).astype(np.float32)


def fit(texts: list[str], labels: np.ndarray, cfg: NgramsConfig,
        soft: tuple[list[str], np.ndarray] | None = None) -> NgramModel:
    """Vocabulary and idf from the training reviews; NB ratio and regression from them and
    from `soft` (reviews, P(positive)) when given: unlabelled reviews with another model's
    probabilities (`ngrams.cotrain`). A soft row enters the regression twice, as positive with
    weight p and as negative with weight 1 - p (its cross-entropy on p), and the NB ratio as
    its likelier class. Its n-grams count only where the training reviews have them: counting
    every n-gram of 72,500 reviews took more memory than training the BiLSTM."""
    from sklearn.linear_model import LogisticRegression

    vocabulary, idf = build_vocabulary(texts, cfg)
    n_gold = len(texts)
    if soft is not None:
        texts, labels = texts + soft[0], np.concatenate([labels, (soft[1] > 0.5).astype(labels.dtype)])
    log.info("n-grams: %d of order 1-%d in at least %d training reviews", len(vocabulary),
             cfg.order, cfg.min_df)
    layer = NgramLogit(vocabulary, cfg.order)
    layer.set_values(idf, np.zeros_like(idf), 0.0)
    x = feature_matrix(layer, texts)
    ratio = nb_ratio(x, labels) if cfg.nb_weighting else np.ones(x.shape[1], np.float32)
    x = x @ sparse.diags(ratio)
    weight = None
    if soft is not None:
        p = soft[1].astype(np.float64)
        x = sparse.vstack([x, x[n_gold:]]).tocsr()
        labels = np.concatenate([labels[:n_gold], np.ones(len(p)), np.zeros(len(p))])
        weight = np.concatenate([np.ones(n_gold), p, 1.0 - p])
    regression = LogisticRegression(C=cfg.inverse_l2, max_iter=cfg.max_iter)
    regression.fit(x, labels, sample_weight=weight)
    weights = (regression.coef_.ravel() * ratio).astype(np.float32)
    return NgramModel(vocabulary, idf, weights, float(regression.intercept_[0]), cfg.order)


def save(m: NgramModel, path: Path) -> None:
    """One .npz (vocabulary included), all or nothing."""
    # n-grams never hold a newline (they are split on whitespace): one UTF-8 buffer, no pickle
    vocabulary = np.frombuffer("\n".join(m.vocabulary).encode("utf-8"), dtype=np.uint8)
    with atomic_path(path) as tmp, tmp.open("wb") as f:
        np.savez(f, vocabulary=vocabulary, idf=m.idf, weights=m.weights,
                 bias=m.bias, order=m.order, blend=np.array(m.blend))


def load(path: Path) -> NgramModel:
    with np.load(path) as z:
        vocabulary = z["vocabulary"].tobytes().decode("utf-8").split("\n")
        return NgramModel(vocabulary, z["idf"], z["weights"], float(z["bias"]),
                          int(z["order"]), tuple(float(v) for v in z["blend"]))
