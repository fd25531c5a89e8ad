"""Scoring, the blend and the metrics, on hand-made numbers and a tiny built model."""

import numpy as np
import pytest
import tensorflow as tf

from pipeline import scoring
from pipeline.config import NgramsConfig, VectorizeConfig
from pipeline.model import build_model, logit_fn
from pipeline.ngrams import fit as fit_ngrams
from pipeline.vectorize import make_vectorizer, texts_to_padded_ids
from tests.helpers import NEGATIVE, NEUTRAL, POSITIVE, make_review, sigmoid


def test_metrics_of_known_predictions():
    p = np.array([0.9, 0.8, 0.3, 0.6, 0.1, 0.2, 0.5, 0.4])
    y = np.array([1, 1, 1, 0, 0, 0, 1, 0])
    m = scoring.metrics_of(p, y)
    # 0.5 counts as positive: tp 0.9, 0.8, 0.5; fn 0.3; fp 0.6; tn 0.1, 0.2, 0.4
    assert m["confusion_matrix"]["rows_true_cols_pred"] == [[3, 1], [1, 3]]
    assert m["examples"] == 8 and m["accuracy"] == 0.75
    assert m["precision"] == 0.75 and m["recall"] == 0.75
    # 13 of the 16 (positive, negative) pairs are ranked right
    assert m["auc"] == pytest.approx(13 / 16, abs=2e-3)
    expected_loss = -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))
    assert m["loss"] == pytest.approx(expected_loss)


def test_metrics_of_no_positive_prediction_and_certain_mistakes():
    m = scoring.metrics_of(np.array([0.0, 0.0]), np.array([1, 0]))
    assert m["precision"] == 0.0 and m["recall"] == 0.0 and m["accuracy"] == 0.5
    assert np.isfinite(m["loss"]) and m["loss"] > 5  # clipped, not infinite


def test_metrics_of_takes_a_column_of_probabilities():
    flat = scoring.metrics_of(np.array([0.2, 0.7, 0.9]), np.array([0, 1, 0]))
    column = scoring.metrics_of(np.array([[0.2], [0.7], [0.9]], dtype=np.float32), np.array([0, 1, 0]))
    assert column["confusion_matrix"] == flat["confusion_matrix"]
    assert column["auc"] == pytest.approx(flat["auc"])


def test_blend_weighs_the_informative_logit():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 2000)
    informative = (2 * labels - 1) * 2.0 + rng.normal(0, 1, 2000)
    noise = rng.normal(0, 1, 2000)
    a, b, _ = scoring.fit_blend(informative, noise, labels)
    assert a > 1.0 and abs(b) < 0.2
    blend = (0.5, 2.0, -1.0)
    z = scoring.blend_logit(np.array([1.0, 2.0]), np.array([0.5, -1.0]), blend)
    assert np.allclose(z, [0.5, -2.0])
    assert np.allclose(scoring.blend_logit(tf.constant([1.0, 2.0]), tf.constant([0.5, -1.0]), blend), z)


def test_served_probabilities_blend_only_with_a_branch():
    z_lstm, z_ngram = np.array([0.0, 2.0]), np.array([1.0, -1.0])

    class Branch:
        blend = (1.0, 1.0, 0.5)

    assert np.allclose(scoring.served_probabilities(z_lstm, None, None), sigmoid(z_lstm))
    assert np.allclose(scoring.served_probabilities(z_lstm, z_ngram, Branch()),
                       sigmoid(np.array([1.5, 1.5])))


@pytest.fixture(scope="module")
def scored_parts():
    """A tiny untrained model, a vectorizer and a fitted n-gram branch with a blend set."""
    import dataclasses
    import random

    rng = random.Random(0)
    labels = np.array([i % 2 for i in range(60)])
    texts = [make_review(rng, int(y)) for y in labels]
    vectorizer = make_vectorizer(VectorizeConfig(max_tokens=50, max_length=16),
                                 POSITIVE + NEGATIVE + NEUTRAL)
    model = build_model(vectorizer.vocabulary_size(), embedding_dim=4, lstm_units=3)
    branch = fit_ngrams(texts, labels, NgramsConfig(enabled=True, order=2, min_df=1))
    branch = dataclasses.replace(branch, blend=(0.7, 1.3, -0.2))
    return vectorizer, model, branch, texts, labels


def test_score_texts_keeps_input_order_whatever_the_batches(scored_parts):
    vectorizer, model, branch, texts, _ = scored_parts
    texts = texts[:7] + ["", "great " * 30]  # lengths out of order, an empty one, a long one
    z_lstm, z_ngram = scoring.score_texts(vectorizer, model, texts, 16, branch, batch_size=3)
    direct = logit_fn(model)(texts_to_padded_ids(vectorizer, tf.constant(texts), 16)).numpy()
    assert np.allclose(z_lstm, direct, atol=1e-5)
    assert np.allclose(z_ngram, branch.layer(tf.constant(texts)).numpy(), atol=1e-5)
    assert scoring.score_texts(vectorizer, model, texts, 16)[1] is None  # no branch, no n-gram logits


def test_in_memory_predict_matches_the_traced_serving_function(scored_parts):
    vectorizer, model, branch, texts, _ = scored_parts
    eager = scoring.in_memory_predict(vectorizer, model, texts[:10], 16, branch)
    traced = scoring.served_probability(vectorizer, logit_fn(model), branch, tf.constant(texts[:10]), 16)
    assert np.allclose(eager, traced.numpy(), atol=1e-5)


def test_evaluate_scores_the_blend_and_each_part(scored_parts):
    vectorizer, model, branch, texts, labels = scored_parts
    m = scoring.evaluate_rows(vectorizer, model, texts, labels, 16, branch)[0]
    z_lstm, z_ngram = scoring.score_texts(vectorizer, model, texts, 16, branch)
    served = scoring.metrics_of(sigmoid(0.7 * z_lstm + 1.3 * z_ngram - 0.2), labels)
    assert m["accuracy"] == served["accuracy"] and m["auc"] == pytest.approx(served["auc"])
    assert m["ngrams"]["accuracy"] == scoring.metrics_of(sigmoid(z_ngram), labels)["accuracy"]
    assert m["ngrams"]["accuracy"] == 1.0  # the branch fits all 60 of its own separable training reviews
    assert m["blend"] == {"lstm": 0.7, "ngrams": 1.3, "intercept": -0.2}
    alone = scoring.evaluate_rows(vectorizer, model, texts, labels, 16, None)[0]
    assert "lstm" not in alone and "blend" not in alone
    assert alone["accuracy"] == scoring.metrics_of(sigmoid(z_lstm), labels)["accuracy"]
