"""The n-gram branch fitted beside a trained LSTM, and stacked on it.

`fit_ngram_branch` fits the n-gram regression (`pipeline.ngrams`) on the training reviews,
co-trained with `ngrams.cotrain` on unlabelled reviews that the LSTM labels, then the blend of
the two logits on the validation reviews (`pipeline.scoring.fit_blend`). Training and the
benchmark fit here; `pipeline.scoring` only applies what was fitted.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import keras
import numpy as np

from pipeline import ngrams
from pipeline.config import Config
from pipeline.ngrams import NgramModel
from pipeline.scoring import fit_blend, score_texts, sigmoid

log = logging.getLogger(__name__)


def fit_ngram_branch(cfg: Config, vectorizer: keras.layers.TextVectorization, model: keras.Model,
                     train: tuple[list[str], np.ndarray], validation: tuple[list[str], np.ndarray],
                     branch: NgramModel | None = None, unlabelled: list[str] | None = None
                     ) -> NgramModel:
    """The n-gram regression on the training reviews (unless `branch` is that regression
    already: a distilling run's teacher), plus, given `unlabelled` reviews, those labelled by
    the trained LSTM's probabilities (co-training); then its blend with the LSTM on the
    validation reviews (which neither model was fitted on)."""
    t0 = time.time()
    if unlabelled is not None:
        z_lstm, _ = score_texts(vectorizer, model, unlabelled, cfg.vectorize.max_length)
        log.info("n-gram branch: fitting on %d training reviews + %d labelled by the LSTM",
                 len(train[0]), len(unlabelled))
        branch = ngrams.fit(*train, cfg.ngrams, soft=(unlabelled, sigmoid(z_lstm)))
    elif branch is None:
        log.info("n-gram branch: fitting on %d training reviews", len(train[0]))
        branch = ngrams.fit(*train, cfg.ngrams)
    texts, labels = validation
    z_lstm, z_ngram = score_texts(vectorizer, model, texts, cfg.vectorize.max_length, branch)
    branch = dataclasses.replace(branch, blend=fit_blend(z_lstm, z_ngram, labels))
    a, b, c = branch.blend
    log.info("n-gram branch: %d n-grams in %.0fs; validation accuracy LSTM %.4f, n-grams %.4f; "
             "blend %.3f x LSTM + %.3f x n-grams %+.3f", len(branch.vocabulary), time.time() - t0,
             np.mean((z_lstm > 0) == labels), np.mean((z_ngram > 0) == labels), a, b, c)
    return branch
