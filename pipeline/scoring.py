"""Evaluation's one home: raw texts -> the parts' logits -> the blend -> probabilities -> metrics.

Training, the benchmark and the export check all score through here, so "what the model
says about a review" is computed one way: the LSTM's logit (`score_texts`), the n-gram
branch's logit (`pipeline.ngrams` holds the branch itself), their blend, fitted on the
validation split (`fit_blend`, which `pipeline.stacking` calls) and applied in NumPy
(`served_probabilities`) or in TensorFlow ops for the SavedModel (`served_probability`),
and the metrics of the result.
"""

from __future__ import annotations

import functools

import keras
import numpy as np
import tensorflow as tf

from pipeline.constants import LABELS, THRESHOLD
from pipeline.model import logit_fn
from pipeline.ngrams import NgramModel
from pipeline.vectorize import texts_to_padded_ids

# --- the parts' logits --------------------------------------------------------------------------


def score_texts(vectorizer: keras.layers.TextVectorization, model: keras.Model, texts: list[str],
                max_length: int, ngram: NgramModel | None = None, batch_size: int = 256,
                graph: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """The LSTM's logits of `texts` and, given a branch, the n-gram regression's, in input order.

    Reviews of similar length share a batch, so the LSTM runs over little padding.
    `graph=False` runs eagerly: slower, but traced by nothing that the export traces.
    """
    lstm_logit = functools.partial(logit_fn(model), training=False)
    branch = ngram.layer if ngram is not None else None
    if graph:
        lstm_logit = tf.function(lstm_logit, input_signature=[tf.TensorSpec([None, None], tf.int64)])
        if branch is not None:
            branch = tf.function(branch, input_signature=[tf.TensorSpec([None], tf.string)])
    order = np.argsort([len(t) for t in texts], kind="stable")
    z_lstm, z_ngram = np.zeros(len(texts)), np.zeros(len(texts))
    for start in range(0, len(texts), batch_size):
        index = order[start:start + batch_size]
        batch = tf.constant([texts[i] for i in index], dtype=tf.string)
        z_lstm[index] = lstm_logit(texts_to_padded_ids(vectorizer, batch, max_length)).numpy()
        if branch is not None:
            z_ngram[index] = branch(batch).numpy()
    return z_lstm, (z_ngram if branch is not None else None)


def ngram_logits(branch: NgramModel, texts: list[str], batch_size: int = 512) -> np.ndarray:
    """The n-gram regression's logits of `texts` alone, in input order (no LSTM needed)."""
    score = tf.function(branch.layer, input_signature=[tf.TensorSpec([None], tf.string)])
    parts = [score(tf.constant(texts[i:i + batch_size])).numpy() for i in range(0, len(texts), batch_size)]
    return np.concatenate(parts) if parts else np.zeros(0)


# --- the blend ----------------------------------------------------------------------------------


def fit_blend(lstm_logits: np.ndarray, ngram_logits: np.ndarray, labels: np.ndarray
              ) -> tuple[float, float, float]:
    """Weights of the two logits and an intercept: a logistic regression on held-out reviews."""
    from sklearn.linear_model import LogisticRegression

    stacked = LogisticRegression().fit(np.c_[lstm_logits, ngram_logits], labels)
    a, b = (float(w) for w in stacked.coef_.ravel())
    return a, b, float(stacked.intercept_[0])


def blend_logit(lstm_logit, ngram_logit, blend: tuple[float, float, float]):
    """The served logit: works on NumPy arrays and on tensors alike."""
    a, b, c = blend
    return a * lstm_logit + b * ngram_logit + c


# --- served probabilities -----------------------------------------------------------------------


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def served_probabilities(z_lstm: np.ndarray, z_ngram: np.ndarray | None, ngram: NgramModel | None
                         ) -> np.ndarray:
    """The served probability from the parts' logits (`score_texts`): the blend, or the LSTM's."""
    return sigmoid(z_lstm if ngram is None else blend_logit(z_lstm, z_ngram, ngram.blend))


def served_probability(vectorizer: keras.layers.TextVectorization, lstm_logit,
                       ngram: NgramModel | None, text: tf.Tensor, max_length: int) -> tf.Tensor:
    """Raw strings -> probability in TensorFlow ops: the export's signature and the bench's
    in-memory comparison trace this one function."""
    logit = lstm_logit(texts_to_padded_ids(vectorizer, text, max_length))
    if ngram is not None:
        logit = blend_logit(logit, ngram.layer(text), ngram.blend)
    return tf.sigmoid(tf.cast(logit, tf.float32))


def in_memory_predict(vectorizer: keras.layers.TextVectorization, model: keras.Model,
                      texts: list[str], max_length: int, ngram: NgramModel | None = None
                      ) -> np.ndarray:
    """Probabilities from the in-memory vectorizer, model and n-gram branch: the export's reference."""
    z_lstm, z_ngram = score_texts(vectorizer, model, texts, max_length, ngram, graph=False)
    return served_probabilities(z_lstm, z_ngram, ngram)


# --- metrics ------------------------------------------------------------------------------------


def auc_of(p: np.ndarray, y: np.ndarray) -> float | None:
    """ROC AUC, or None where it is undefined: the labels hold one class only."""
    if np.unique(y).size < 2:
        return None
    auc = keras.metrics.AUC(num_thresholds=1000)
    auc.update_state(y, p)
    return float(auc.result())


def metrics_of(p: np.ndarray, y: np.ndarray, labels: tuple[str, str] = LABELS) -> dict:
    """Accuracy, precision, recall, AUC (None for one class), loss and the confusion matrix of
    probabilities `p`, its rows and columns named by `labels` (label 0, label 1)."""
    p, y = np.asarray(p, dtype=np.float64).reshape(-1), np.asarray(y).reshape(-1)
    pred = (p >= THRESHOLD).astype(np.int64)
    tp, fp = int(np.sum((pred == 1) & (y == 1))), int(np.sum((pred == 1) & (y == 0)))
    tn, fn = int(np.sum((pred == 0) & (y == 0))), int(np.sum((pred == 0) & (y == 1)))
    eps = 1e-7
    pc = np.clip(p, eps, 1 - eps)
    return {
        "examples": int(y.size),
        "accuracy": (tp + tn) / y.size,
        "precision": tp / (tp + fp) if tp + fp else 0.0,
        "recall": tp / (tp + fn) if tp + fn else 0.0,
        "auc": auc_of(p, y),
        "loss": float(-np.mean(y * np.log(pc) + (1 - y) * np.log(1 - pc))),
        "confusion_matrix": {"labels": list(labels), "rows_true_cols_pred": [[tn, fp], [fn, tp]]},
    }


def evaluate_rows(vectorizer: keras.layers.TextVectorization, model: keras.Model, texts: list[str],
                  labels: np.ndarray, max_length: int, ngram: NgramModel | None,
                  names: tuple[str, str] = LABELS) -> tuple[dict, np.ndarray]:
    """Metrics of the served model on `texts` (their `labels` 0/1), and the served probabilities
    it scored (the release gate compares on them); with an n-gram branch, each part's metrics as
    well. `names`: the user's names of label 0 and label 1."""
    z_lstm, z_ngram = score_texts(vectorizer, model, texts, max_length, ngram)
    served = served_probabilities(z_lstm, z_ngram, ngram)
    metrics = metrics_of(served, labels, names)
    if ngram is None:
        return metrics, served
    for part, z in (("lstm", z_lstm), ("ngrams", z_ngram)):
        alone = metrics_of(sigmoid(z), labels)
        metrics[part] = {k: alone[k] for k in ("accuracy", "auc", "loss")}
    metrics["blend"] = dict(zip(("lstm", "ngrams", "intercept"), ngram.blend, strict=True))
    return metrics, served
