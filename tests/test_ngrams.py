import math
import random

import numpy as np
import pytest
import tensorflow as tf

from pipeline import ngrams
from pipeline.config import NgramsConfig
from tests.helpers import make_review


def _reviews(n: int, seed: int = 0) -> tuple[list[str], np.ndarray]:
    rng = random.Random(seed)
    labels = np.array([i % 2 for i in range(n)])
    return [make_review(rng, int(y)) for y in labels], labels


def test_vocabulary_counts_reviews_not_occurrences():
    texts = ["Good movie.", "good FILM", "bad movie, bad bad"]
    vocabulary, idf = ngrams.build_vocabulary(texts, NgramsConfig(order=2, min_df=2))
    # "bad" is in one review (three times): below min_df; punctuation and case are standardized
    assert vocabulary == ["good", "movie"]
    assert idf == pytest.approx([math.log(4 / 3) + 1] * 2)
    capped, _ = ngrams.build_vocabulary(texts, NgramsConfig(order=2, min_df=1, max_features=3))
    assert capped == ["good", "movie", "bad"]  # most reviews first, ties alphabetical
    bigrams, _ = ngrams.build_vocabulary(texts * 2, NgramsConfig(order=2, min_df=2))
    assert {"good movie", "bad movie", "bad bad"} <= set(bigrams)


def test_features_are_scikit_learns_sublinear_tfidf():
    from sklearn.feature_extraction.text import TfidfVectorizer

    texts, _ = _reviews(60)
    cfg = NgramsConfig(order=2)
    vocabulary, idf = ngrams.build_vocabulary(texts, cfg)
    layer = ngrams.NgramLogit(vocabulary, cfg.order)
    layer.set_values(idf, np.zeros_like(idf), 0.0)
    ours = ngrams.feature_matrix(layer, texts + ["", "unseen words only"]).toarray()

    def analyzer(text):
        return [g.decode() for g in ngrams._grams(tf.constant([text]), cfg.order).to_list()[0]]

    reference = TfidfVectorizer(analyzer=analyzer, vocabulary=vocabulary, sublinear_tf=True)
    reference.fit(texts)
    assert np.allclose(reference.idf_, idf, rtol=1e-6)
    expected = reference.transform(texts + ["", "unseen words only"]).toarray()
    assert ours.shape == expected.shape
    assert np.allclose(ours, expected, atol=1e-6)
    assert not ours[-2:].any()  # nothing known: an all-zero row, not a division by zero


def test_nb_ratio_points_to_the_class():
    from scipy import sparse

    x = sparse.csr_matrix(np.array([[1, 0, 1], [1, 0, 1], [0, 1, 1], [0, 1, 1]], dtype=float))
    ratio = ngrams.nb_ratio(x, np.array([1, 1, 0, 0]))
    assert ratio[0] > 0 > ratio[1] and ratio[2] == pytest.approx(0.0)


def test_branch_separates_reviews_and_round_trips(tmp_path):
    texts, labels = _reviews(200)
    model = ngrams.fit(texts, labels, NgramsConfig(order=2))
    assert len(model.vocabulary) == len(model.idf) == len(model.weights)
    held_out, held_labels = _reviews(100, seed=1)
    logits = model.layer(tf.constant(held_out)).numpy()
    assert np.array_equal(logits > 0, held_labels == 1)  # all 100 unseen reviews, as a fixed seed gives
    assert model.layer is model.layer  # its lookup table is built once, not per use
    # the weights carry the NB ratio: a positive word pulls up, a negative one down
    weight = dict(zip(model.vocabulary, model.weights, strict=True))
    assert weight["wonderful"] > 0 > weight["awful"]

    path = tmp_path / "ngrams.npz"
    ngrams.save(model, path)
    assert [p.name for p in tmp_path.iterdir()] == ["ngrams.npz"]  # no temporary file left
    again = ngrams.load(path)
    assert again.vocabulary == model.vocabulary and again.order == model.order
    assert np.array_equal(ngrams.ngram_layer(again)(tf.constant(held_out)).numpy(), logits)


def test_soft_rows_teach_the_branch_their_probabilities():
    texts, labels = _reviews(200)
    # "zorgle" is in one positive and one negative training review, and in every unlabelled
    # one: its weight's sign can only come from their labels
    texts[0], texts[1] = f"zorgle {texts[0]}", f"zorgle {texts[1]}"
    unlabelled = [f"zorgle {t}" for t in _reviews(40, seed=2)[0]]
    weights = {}
    for p in (0.95, 0.05):
        model = ngrams.fit(texts, labels, NgramsConfig(order=1), soft=(unlabelled, np.full(40, p)))
        weights[p] = dict(zip(model.vocabulary, model.weights, strict=True))["zorgle"]
    assert weights[0.95] > 0 > weights[0.05]
    # n-grams only the unlabelled reviews have stay out: the vocabulary is the training reviews'
    extra = ngrams.fit(texts, labels, NgramsConfig(order=1), soft=(["blorp " + t for t in unlabelled],
                                                                    np.full(40, 0.9)))
    assert extra.vocabulary == ngrams.fit(texts, labels, NgramsConfig(order=1)).vocabulary
